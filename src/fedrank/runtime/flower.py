"""The Flower runtime: a ``Runtime`` over a Flower ``Grid`` and a ClientApp around the same client half.

Nothing method-specific lives here.  The server side is ``fedrank.server.Server`` with a
``FlowerRuntime`` that turns every job ``(Task, payload)`` into one Flower ``Message`` for
the node that serves the task's client, and turns the reply back into ``(Reply, stats)``.
The client side is ``fedrank.client.FedClient`` (built once per process from the run's
config and cached) answering those messages.

Wire format (one message per job):

* ``content["tensors"]``: an ``ArrayRecord`` with the payload / upload tensors;
* ``content["task"]``: a ``ConfigRecord`` with ``client``, ``rank``, ``round`` and the
  fedrank ``config`` (TOML text, so a client can build its experiment without any
  out-of-band configuration);
* reply ``content["reply"]``: a ``MetricRecord`` with the aggregation ``weight`` and the
  training stats.

Node mapping: a node with ``node_config`` ``partition-id=i num-partitions=N`` serves the
fedrank clients ``c`` with ``c % N == i``; ``device='cuda:1'`` in its node config makes it
train and evaluate on that device instead of the run config's ``device``.  Client sampling stays fedrank's own seeded
sampling (``Server.round``); Flower's sampling is never used.

Faults: a round waits at most ``timeout_s`` (constructor argument, default the config's
``runtime_timeout_s``) for its replies; a client
whose reply is an error or does not arrive in time is logged and left out, and the server
records it under ``missing``.

Entry points:

* ``client_app``: the ClientApp of a deployment (``flwr run deploy/flower``) and of the simulation;
  the deployment's ServerApp is ``fedrank.serverapp.server_app``, which runs a job
  (``fedrank.job``) through a ``FlowerRuntime``.
* ``SimulationRuntime``: ``runtime = "flower"`` in a fedrank config; runs the clients in
  Flower's simulation engine (Ray, on 127.0.0.1) from ``fedrank run``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from queue import Queue
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tomli_w  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedrank import wire  # noqa: E402
from fedrank.client import FedClient, split_head, with_head  # noqa: E402
from fedrank.config import Config, load_config, to_dict  # noqa: E402
from fedrank.methods import Reply, Task, Tensors  # noqa: E402
from fedrank.methods.base import Factors, pack, unpack  # noqa: E402
from fedrank.runtime import Job, Outcome  # noqa: E402

FAULT_ENV = "FEDRANK_FLOWER_FAULT"  # test hook, see _maybe_fault


# --------------------------------------------------------------------------- codec


def config_text(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def config_from_text(text: str) -> Config:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().contiguous()
                                              for k, v in wire.as_numpy_safe(tensors).items()})


def from_record(record: ArrayRecord) -> Tensors:
    return wire.from_numpy_safe({k: t.clone() for k, t in record.to_torch_state_dict().items()})


def task_record(task: Task, config: str) -> ConfigRecord:
    return ConfigRecord({"client": task.client, "rank": task.rank, "round": task.round, "config": config})


def record_task(record: ConfigRecord) -> Task:
    return Task(int(record["client"]), int(record["rank"]), int(record["round"]))


# --------------------------------------------------------------------------- server side


class FlowerRuntime:
    """The ``Runtime`` protocol over a Flower ``Grid``: one message per job, to the node serving its client."""

    def __init__(self, grid: Grid, cfg: Config, timeout_s: float | None = None,
                 wait_nodes_s: float | None = None, log: Callable[[str], None] = print) -> None:
        """``timeout_s``: how long a round waits for replies (default the config's ``runtime_timeout_s``);
        ``wait_nodes_s``: how long the first round waits for the SuperNodes to answer (default ``timeout_s``:
        on a loaded machine starting them is as slow as a round)."""
        self.grid, self.cfg, self.config = grid, cfg, config_text(cfg)
        self.timeout_s = cfg.runtime_timeout_s if timeout_s is None else timeout_s
        self.wait_nodes_s = self.timeout_s if wait_nodes_s is None else wait_nodes_s
        self.log = log
        self.partitions: dict[int, int] = {}  # partition id -> node id
        self.num_partitions = 0

    # ------------------------------------------------------------- nodes

    def discover(self) -> None:
        """Ask every connected node for its partition id; wait until all ``num-partitions`` are known."""
        deadline = time.monotonic() + self.wait_nodes_s
        asked: set[int] = set()
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                msgs = [Message(RecordDict({"task": ConfigRecord({"config": ""})}), dst_node_id=n,
                                message_type="query.partition") for n in new]
                for reply in self.grid.send_and_receive(msgs, timeout=max(deadline - time.monotonic(), 1.0)):
                    if reply.has_error():
                        continue
                    rec = reply.content["partition"]
                    self.partitions[int(rec["partition-id"])] = reply.metadata.src_node_id
                    self.num_partitions = max(self.num_partitions, int(rec["num-partitions"]))
                asked.update(new)
            if self.num_partitions and len(self.partitions) >= self.num_partitions:
                return
            if time.monotonic() > deadline:
                if self.partitions:
                    self.log(f"flower: only partitions {sorted(self.partitions)} of {self.num_partitions} "
                             f"connected after {self.wait_nodes_s:.0f} s; going on with them")
                    return
                raise RuntimeError(f"flower: no SuperNode answered within {self.wait_nodes_s:.0f} s")
            time.sleep(0.5)

    def node_for(self, client: int) -> int | None:
        if not self.partitions:
            self.discover()
        return self.partitions.get(client % self.num_partitions)

    # ------------------------------------------------------------- messaging

    def _exchange(self, kind: str, jobs: list[tuple[Task, Tensors]],
                  on_reply: Callable[[Task, Message], None]) -> None:
        """Send one message per job, collect replies until all arrived or the timeout passed."""
        pending: dict[str, Task] = {}
        messages, tasks = [], []
        for task, tensors in jobs:
            node = self.node_for(task.client)
            if node is None:
                self.log(f"flower: round {task.round}: no node serves client {task.client}; it is missing")
                continue
            content = RecordDict({"tensors": to_record(tensors), "task": task_record(task, self.config)})
            messages.append(Message(content, dst_node_id=node, message_type=kind,
                                    group_id=str(task.round)))
            tasks.append(task)
        if not messages:
            return
        for mid, task in zip(self.grid.push_messages(messages), tasks):
            pending[mid] = task
        deadline = time.monotonic() + self.timeout_s
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                task = pending.pop(reply.metadata.reply_to_message_id, None)
                if task is None:
                    continue
                if reply.has_error():
                    self.log(f"flower: round {task.round}: client {task.client} failed: {reply.error.reason}")
                    continue
                on_reply(task, reply)
            if pending and time.monotonic() > deadline:
                for task in pending.values():
                    self.log(f"flower: round {task.round}: client {task.client} did not reply within "
                             f"{self.timeout_s:g} s; it is missing")
                return
            if pending:
                time.sleep(0.05)

    def fit(self, jobs: Sequence[Job], done: Callable[[Task], None]) -> list[Outcome]:
        got: dict[Task, Outcome] = {}

        def on_reply(task: Task, reply: Message) -> None:
            metrics = dict(reply.content["reply"])
            weight = float(metrics.pop("weight"))
            got[task] = (Reply(task, weight, from_record(reply.content["tensors"])),
                         {k: float(v) for k, v in metrics.items()})
            done(task)

        self._exchange("train", list(jobs), on_reply)
        return [got[task] for task, _ in jobs if task in got]  # job order, as the local runtime

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, float]:
        rnd = -1
        payload = with_head(pack(factors), head)
        scores: dict[int, float] = {}

        def on_reply(task: Task, reply: Message) -> None:
            scores[task.client] = float(reply.content["reply"]["accuracy"])

        self._exchange("evaluate", [(Task(c, 0, rnd), payload) for c in clients], on_reply)
        return {c: scores[c] for c in clients if c in scores}

    def close(self) -> None:
        """Nothing to release: the SuperLink and its SuperNodes outlive the run."""


# --------------------------------------------------------------------------- client side

_CLIENTS: dict[str, FedClient] = {}
_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()  # one model per process: messages handled in threads take turns


def cached_client(config: str, device: str = "", partition: tuple[int, int] | None = None) -> FedClient:
    """This process's ``FedClient`` for a config, with the data of the clients of ``partition`` = (i, n) (the
    clients ``c`` with ``c % n == i``; every client when ``None``) loaded.

    The model and method are built once per process (on ``device`` when given, a SuperNode's own choice, else on
    the config's); each client's data is read from the shard cache or built once (``fedrank.shards``)."""
    from fedrank.experiment import build_node_client

    key = hashlib.sha256(f"{device}\n{config}".encode()).hexdigest()
    with _LOCK:
        cfg = config_from_text(config)
        i, n = partition or (0, 1)
        clients = [c for c in range(cfg.clients.count) if c % n == i]
        if key not in _CLIENTS:
            _CLIENTS.clear()
            cfg.device = device or cfg.device
            _CLIENTS[key] = build_node_client(cfg, clients)
        client = _CLIENTS[key]
        client.data.require(clients)
        return client


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) of a node (its ``--node-config``; 0 of 1 when not given)."""
    nc = context.node_config
    return int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))


def node_client(msg: Message, context: Context) -> FedClient:
    """The client for a message's config with this node's clients' data, on this node's ``device`` (node config)
    if it names one."""
    return cached_client(str(msg.content["task"]["config"]), str(context.node_config.get("device", "")),
                         node_partition(context))


def _maybe_fault(task: Task) -> None:
    """Test hook: ``FEDRANK_FLOWER_FAULT="hang:<client>:<round>[:<seconds>]"`` or ``"fail:<client>:<round>"``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, client, rnd, *rest = spec.split(":")
    if int(client) == task.client and int(rnd) == task.round:
        if kind == "hang":
            time.sleep(float(rest[0]) if rest else 3600.0)
        elif kind == "fail":
            raise RuntimeError(f"injected failure of client {task.client} in round {task.round}")
        elif kind == "die":
            os._exit(1)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    task = record_task(msg.content["task"])
    client = node_client(msg, context)
    _maybe_fault(task)
    with _RUN_LOCK:
        reply, stats = client.fit(task, from_record(msg.content["tensors"]))
    metrics = MetricRecord({"weight": float(reply.weight), **{k: float(v) for k, v in stats.items()}})
    return Message(RecordDict({"tensors": to_record(reply.tensors), "reply": metrics}), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    task = record_task(msg.content["task"])
    client = node_client(msg, context)
    received, head = split_head(from_record(msg.content["tensors"]))
    with _RUN_LOCK:
        acc = client.validate(task.client, unpack(received), head)
    return Message(RecordDict({"reply": MetricRecord({"accuracy": float(acc)})}), reply_to=msg)


@client_app.query("partition")
def _partition(msg: Message, context: Context) -> Message:
    i, n = node_partition(context)
    rec = ConfigRecord({"partition-id": i, "num-partitions": n})
    return Message(RecordDict({"partition": rec}), reply_to=msg)


# --------------------------------------------------------------------------- simulation from `fedrank run`


class SimulationRuntime:
    """``runtime = "flower"``: the rounds go through Flower's simulation engine (Ray on 127.0.0.1).

    ``run_simulation`` runs in a background thread with a bridge ServerApp that hands its
    ``Grid`` to this object and waits; the fedrank ``Server`` in the caller's thread drives
    the rounds through ``FlowerRuntime``.  The simulation stops after the last round's
    messages (or on ``close()`` / interpreter exit).
    """

    def __init__(self, exp: Any, num_supernodes: int | None = None, timeout_s: float | None = None,
                 num_cpus: int | None = None, cpus_per_client: float = 1.0) -> None:
        self.exp, self.cfg = exp, exp.cfg
        self.num_supernodes = num_supernodes or self.cfg.clients.count
        self.timeout_s = timeout_s
        self.num_cpus = num_cpus or (os.cpu_count() or 1)
        self.cpus_per_client = cpus_per_client
        self.inner: FlowerRuntime | None = None
        self._round = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: Queue[BaseException] = Queue()

    def _start(self) -> FlowerRuntime:
        if self.inner is not None:
            return self.inner
        from flwr.simulation import run_simulation

        grids: Queue[Grid] = Queue()
        stop = self._stop
        bridge = ServerApp()

        @bridge.main()
        def _bridge(grid: Grid, context: Context) -> None:
            grids.put(grid)
            stop.wait()

        backend = {
            "init_args": {"num_cpus": self.num_cpus, "include_dashboard": False,
                          "_node_ip_address": "127.0.0.1", "log_to_driver": True},
            "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
        }

        def target() -> None:
            try:
                run_simulation(server_app=bridge, client_app=client_app, num_supernodes=self.num_supernodes,
                               backend_config=backend)
            except BaseException as err:  # noqa: BLE001 - reported to the caller's thread
                traceback.print_exc()
                self._errors.put(err)
            finally:
                grids.put(None)  # type: ignore[arg-type]

        self._thread = threading.Thread(target=target, name="fedrank-flower-simulation", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        grid = grids.get()
        if grid is None:
            cause = self._errors.get_nowait() if not self._errors.empty() else "unknown error"
            raise RuntimeError(f"flower simulation did not start: {cause}")
        self.inner = FlowerRuntime(grid, self.cfg, self.timeout_s)
        return self.inner

    def _last(self) -> int:
        return self.cfg.rounds

    def fit(self, jobs: Sequence[Job], done: Callable[[Task], None]) -> list[Outcome]:
        out = self._start().fit(jobs, done)
        self._round = jobs[0][0].round if jobs else 0
        if self._round >= self._last() and self.exp.policy.needs_scores_after_round != self._round:
            self.close()
        return out

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, float]:
        out = self._start().validate(factors, head, clients)
        if self._round >= self._last():
            self.close()
        return out

    def close(self) -> None:
        """Stop the simulation (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.inner = None
