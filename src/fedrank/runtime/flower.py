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
  training stats (``evaluate``: the validation metrics and ``eval_examples``).

Node mapping: a node with ``node_config`` ``partition-id=i num-partitions=N`` serves the
fedrank clients ``c`` with ``c % N == i``; ``device='cuda:1'`` in its node config makes it
train and evaluate on that device instead of the run config's ``device``.  Client sampling stays fedrank's own seeded
sampling (``Server.round``); Flower's sampling is never used.  Node-local data (``data.dataset = "nodes"``): a node
with ``data='PATH'`` in its node config serves one client on that file; it tells the server (``query.partition``)
the file's name, size, label names and a fingerprint of its examples, never a row, and the accepted nodes ordered by
fingerprint are the clients (``FlowerRuntime.node_sizes``).

Faults: a round waits at most ``timeout_s`` (constructor argument, default the config's
``runtime_timeout_s``) for its replies; a client
whose reply is an error or does not arrive in time is logged and left out, and the server
records it under ``missing``.  A job whose node is offline is sent when the node is back within that time; a node
that comes back under a new node id is asked what it serves.

Entry points:

* ``client_app``: the ClientApp of the simulation, answering in its own process (``answer``); a deployment's
  ClientApp is ``fedrank.node_app.client_app``, which hands each message to its SuperNode's warm worker
  (``fedrank.runtime.node_worker``, which calls ``answer``).  The deployment's ServerApp is
  ``fedrank.serverapp.server_app``, which runs a job (``fedrank.job``) through a ``FlowerRuntime``.
* ``SimulationRuntime``: ``runtime = "flower"`` in a fedrank config; runs the clients in
  Flower's simulation engine (Ray, on 127.0.0.1) from ``fedrank run``.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts its workers at nice 15; in the simulation they are the job's clients, so they run at the caller's
# priority (beside other work they would otherwise wait for every idle moment of the CPU).
os.environ.setdefault("RAY_worker_niceness", "0")

import tomli_w  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedrank import wire  # noqa: E402
from fedrank.client import FedClient, split_head, with_head  # noqa: E402
from fedrank.config import NODES, Config, ConfigError, load_config, to_dict  # noqa: E402
from fedrank.data.sources import NODE_DATA, foreign_labels, holdout_size, label_set, read_examples  # noqa: E402
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


def data_problem(rec: ConfigRecord | None, labels: Sequence[str]) -> str:
    """Why a node's report of its data file (node-local data) makes it unusable; "" when it is fine."""
    if rec is None:
        return "it has no data file: start it with --node-config \"data='PATH'\""
    if "error" in rec:
        return str(rec["error"])
    foreign = foreign_labels(rec["labels"], labels)
    return f"{rec['name']} {foreign}" if foreign else ""


def enrolled(cfg: Config, count: int, log: Callable[[str], None]) -> Config:
    """A copy of ``cfg`` for ``count`` enrolled nodes: ``clients.count`` is ``count``, ``clients.per_round`` at
    most that (logged when lowered)."""
    out = copy.deepcopy(cfg)
    out.clients.count = count
    if cfg.clients.per_round > count:
        log(f"flower: {count} nodes enrolled; clients.per_round lowered from {cfg.clients.per_round} to {count}")
        out.clients.per_round = count
    return out


@dataclass(frozen=True)
class NodeShard:
    """What a SuperNode with its own data file (node-local data) told the server about it: never a row."""

    node: int  # Flower node id
    name: str  # the file's name (not its path), for log lines
    examples: int
    labels: list[str]
    fingerprint: str  # SHA-256 of its examples: which client the node is, whatever its node id

    def known(self) -> dict[str, Any]:
        """What the server keeps of it in the run folder (``nodes.json``): all but the node id."""
        return {"name": self.name, "examples": self.examples, "labels": self.labels, "fingerprint": self.fingerprint}


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
        self.partitions: dict[int, int] = {}  # partition id -> node id (node-local data: client id -> node id)
        self.num_partitions = 0
        self.asked: set[int] = set()  # node ids queried so far
        self.refused: set[int] = set()
        self.offers: dict[str, NodeShard] = {}  # node-local data: fingerprint -> what a node reported
        self.clients: list[str] = []  # node-local data, once enrolled: the clients' fingerprints in client order

    # ------------------------------------------------------------- nodes

    @property
    def node_data(self) -> bool:
        """Whether every node trains on its own data file (``data.dataset = nodes``)."""
        return self.cfg.data.dataset == NODES

    def _query(self, nodes: Sequence[int], timeout: float) -> None:
        """Ask ``nodes`` what they serve (``query.partition``, with the run's config) and learn from the answers."""
        self.asked.update(nodes)
        msgs = [Message(RecordDict({"task": ConfigRecord({"config": self.config})}), dst_node_id=n,
                        message_type="query.partition") for n in nodes]
        for reply in self.grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                self.log(f"flower: node {reply.metadata.src_node_id} could not answer: {reply.error.reason}")
            else:
                self._learn(reply.metadata.src_node_id, reply.content)

    def _refuse(self, node: int, why: str) -> None:
        self.refused.add(node)
        self.log(f"flower: refused node {node}: {why}; the run goes on without it")

    def _learn(self, node: int, answer: RecordDict) -> None:
        """Record which clients a node serves: its partition, or (node-local data) the client its data file is."""
        data = answer.get("data")
        if self.node_data:
            self._learn_data(node, data)
        elif data is not None:
            self._refuse(node, f"it has its own data file but data.dataset is not `{NODES}`: set data.dataset={NODES} "
                         "and data.labels to train on the nodes' files")
        else:
            rec = answer["partition"]
            partition = int(rec["partition-id"])
            if partition in self.partitions:
                self.log(f"flower: node {node} serves partition {partition} now")
            self.partitions[partition] = node
            self.num_partitions = max(self.num_partitions, int(rec["num-partitions"]))

    def _learn_data(self, node: int, rec: ConfigRecord | None) -> None:
        """Node-local data: take a node's report of its file as a new client (before enrolment) or as the node now
        serving a known client (a restarted SuperNode), or refuse it with the reason."""
        problem = data_problem(rec, self.cfg.data.labels)
        fingerprint = "" if problem else str(rec["fingerprint"])
        if problem:
            self._refuse(node, problem)
        elif not self.clients and fingerprint in self.offers:
            self._refuse(node, f"its data equals that of node {self.offers[fingerprint].node}")
        elif not self.clients:
            self.offers[fingerprint] = NodeShard(node, str(rec["name"]), int(rec["examples"]),
                                                 [str(v) for v in rec["labels"]], fingerprint)
        elif fingerprint in self.clients:
            self.partitions[self.clients.index(fingerprint)] = node
            self.log(f"flower: node {node} ({rec['name']}) serves client {self.clients.index(fingerprint)} again")
        else:
            self._refuse(node, f"its data ({rec['name']}) is not one of this run's clients (they enrolled at the "
                         "start)")

    def _complete(self) -> bool:
        """Whether every expected node has answered: ``num-partitions`` partitions, or (node-local data)
        ``clients.count`` nodes, refused ones included."""
        if self.node_data:
            return len(self.offers) + len(self.refused) >= self.cfg.clients.count
        return bool(self.num_partitions) and len(self.partitions) >= self.num_partitions

    def _known(self) -> bool:
        """Whether at least one node serves clients."""
        return bool(self.offers) if self.node_data else bool(self.partitions)

    def discover(self) -> None:
        """Query the connected nodes until every expected one has answered, or ``wait_nodes_s`` passed (then go on
        with those that did; none is an error)."""
        deadline = time.monotonic() + self.wait_nodes_s
        while not self._complete():
            new = [n for n in self.grid.get_node_ids() if n not in self.asked]
            if new:
                self._query(new, max(deadline - time.monotonic(), 1.0))
            elif time.monotonic() > deadline:
                if not self._known():
                    raise RuntimeError(f"flower: no SuperNode answered within {self.wait_nodes_s:.0f} s")
                self.log(f"flower: not every expected SuperNode answered within {self.wait_nodes_s:.0f} s; going on "
                         "with those that did")
                return
            else:
                time.sleep(0.5)

    def refresh(self, online: set[int], timeout: float) -> None:
        """Query the ``online`` nodes not asked yet (a restarted SuperNode without an auth key comes back with a new
        node id), waiting at most ``timeout`` (and ``wait_nodes_s``) for their answers."""
        new = [n for n in online if n not in self.asked]
        if new:
            self._query(new, min(timeout, self.wait_nodes_s))

    def node_sizes(self) -> list[int] | None:
        """Node-local data: enrol the SuperNodes and return each client's training examples, in client order (the
        clients are the accepted nodes ordered by their data's fingerprint; ``cfg`` becomes a copy whose
        ``clients.count`` is their number); ``None`` for partitioned data."""
        if not self.node_data:
            return None
        self.discover()
        if not self.offers:
            raise RuntimeError("flower: no SuperNode's data file was accepted (the refusals are above): nothing to "
                               "train on")
        self.clients = sorted(self.offers)
        self.partitions = {c: self.offers[f].node for c, f in enumerate(self.clients)}
        self.num_partitions = len(self.clients)
        self.cfg = enrolled(self.cfg, len(self.clients), self.log)
        self.config = config_text(self.cfg)
        for c, shard in enumerate(self.enrolled):
            self.log(f"flower: client {c} is node {shard.node} ({shard.name}: {shard.examples} examples, labels "
                     f"{shard.labels})")
        return [s.examples - holdout_size(s.examples, self.cfg.clients.val_fraction) for s in self.enrolled]

    @property
    def enrolled(self) -> list[NodeShard]:
        """Node-local data: what the enrolled nodes reported, in client order."""
        return [self.offers[f] for f in self.clients]

    def node_for(self, client: int) -> int | None:
        return self.partitions.get(client % self.num_partitions) if self.num_partitions else None

    # ------------------------------------------------------------- messaging

    def _exchange(self, kind: str, jobs: list[tuple[Task, Tensors]],
                  on_reply: Callable[[Task, Message], None]) -> None:
        """Send one message per job to the node serving its client and collect the replies until all arrived or the
        timeout passed.  A job whose node is offline (a SuperNode that died and is being restarted) is sent when the
        node is back online within that time; an error reply (the client failed, or Flower found its node gone)
        leaves the client missing at once."""
        if not self.partitions:
            self.discover()
        deadline = time.monotonic() + self.timeout_s
        waiting, pending = list(jobs), {}
        look = 0.0  # when to look for the waiting jobs' nodes again
        while waiting or pending:
            if waiting and time.monotonic() >= look:
                waiting, look = self._send(kind, waiting, pending, deadline), time.monotonic() + 1.0
            self._collect(pending, on_reply)
            if time.monotonic() > deadline:
                self._give_up(waiting, pending)
                return
            time.sleep(0.05)

    def _send(self, kind: str, jobs: list[tuple[Task, Tensors]], pending: dict[str, Task],
              deadline: float) -> list[tuple[Task, Tensors]]:
        """Push the jobs whose node is online (querying nodes that connected since the last look, with the time
        left); a job no node serves is missing.  Returns the jobs whose node is offline."""
        online = set(self.grid.get_node_ids())
        self.refresh(online, max(deadline - time.monotonic(), 1.0))
        ready, offline = [], []
        for task, tensors in jobs:
            node = self.node_for(task.client)
            if node is None:
                self.log(f"flower: round {task.round}: no node serves client {task.client}; it is missing")
            else:
                (ready if node in online else offline).append((task, tensors, node))
        messages = [Message(RecordDict({"tensors": to_record(tensors), "task": task_record(task, self.config)}),
                            dst_node_id=node, message_type=kind, group_id=str(task.round))
                    for task, tensors, node in ready]
        if messages:
            pending.update(zip(self.grid.push_messages(messages), [task for task, _, _ in ready]))
        return [(task, tensors) for task, tensors, _ in offline]

    def _collect(self, pending: dict[str, Task], on_reply: Callable[[Task, Message], None]) -> None:
        """Hand the replies that arrived to ``on_reply``; log the errors."""
        if not pending:
            return
        for reply in self.grid.pull_messages(list(pending)):
            task = pending.pop(reply.metadata.reply_to_message_id, None)
            if task is None:
                continue
            if reply.has_error():
                self.log(f"flower: round {task.round}: client {task.client} failed: {reply.error.reason}")
            else:
                on_reply(task, reply)

    def _give_up(self, waiting: list[tuple[Task, Tensors]], pending: dict[str, Task]) -> None:
        """The round's time is up: log every client still waiting for its node or for its reply as missing."""
        for task, _ in waiting:
            self.log(f"flower: round {task.round}: the node of client {task.client} stayed offline for "
                     f"{self.timeout_s:g} s; it is missing")
        for task in pending.values():
            self.log(f"flower: round {task.round}: client {task.client} did not reply within {self.timeout_s:g} s; "
                     "it is missing")

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

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, dict[str, float]]:
        rnd = -1
        payload = with_head(pack(factors), head)
        metrics: dict[int, dict[str, float]] = {}

        def on_reply(task: Task, reply: Message) -> None:
            metrics[task.client] = {k: float(v) for k, v in reply.content["reply"].items()}

        self._exchange("evaluate", [(Task(c, 0, rnd), payload) for c in clients], on_reply)
        return {c: metrics[c] for c in clients if c in metrics}

    def close(self) -> None:
        """Nothing to release: the SuperLink and its SuperNodes outlive the run."""


# --------------------------------------------------------------------------- client side

_CLIENTS: dict[str, FedClient] = {}
_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()  # one model per process: messages handled in threads take turns


def every_client(cfg: Config) -> list[int]:
    return list(range(cfg.clients.count))


def cached_client(config: str, device: str = "", clients: Callable[[Config], Sequence[int]] = every_client,
                  data: str = "") -> FedClient:
    """This process's ``FedClient`` for a config, with the data of ``clients(config)`` loaded: their partitions of
    ``data.dataset``, or the node's own file ``data`` (node-local data).

    The model and method are built once per process (on ``device`` when given, a SuperNode's own choice, else on
    the config's); each client's data is read from the shard cache or built once (``fedrank.shards``)."""
    from fedrank.experiment import build_node_client

    key = hashlib.sha256(f"{device}\n{data}\n{config}".encode()).hexdigest()
    with _LOCK:
        cfg = config_from_text(config)
        wanted = clients(cfg)
        if key not in _CLIENTS:
            _CLIENTS.clear()
            cfg.device = device or cfg.device
            _CLIENTS[key] = build_node_client(cfg, wanted, data=data)
        client = _CLIENTS[key]
        client.data.require(wanted)
        return client


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition-id, num-partitions) of a node (its ``--node-config``; 0 of 1 when not given)."""
    return int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))


def node_data(node_config: Mapping[str, Any]) -> str:
    """The node's own data file (``--node-config "data='PATH'"``); "" when it has none."""
    return str(node_config.get("data", ""))


def node_client(content: RecordDict, node_config: Mapping[str, Any]) -> FedClient:
    """The client for a message's config with the data this node holds for it, on this node's ``device`` (node
    config) if it names one: its own file as the message's client, else its partition's clients."""
    data = node_data(node_config)

    def clients(cfg: Config) -> list[int]:
        if data:
            return [int(content["task"]["client"])]
        i, n = node_partition(node_config)
        return [c for c in range(cfg.clients.count) if c % n == i]

    return cached_client(str(content["task"]["config"]), str(node_config.get("device", "")), clients, data)


def data_record(path: str, config: str) -> ConfigRecord:
    """What a node tells the server of its own data file: the file's name, its number of examples, its label names
    and a fingerprint (SHA-256) of its examples; or the one-line reason it cannot be read."""
    try:
        cfg = config_from_text(config)
        texts, raw = read_examples(Path(path), cfg.data, NODE_DATA)
        if not texts:
            raise ConfigError(f"{path} has no examples: give it at least one record")
    except ConfigError as err:
        return ConfigRecord({"error": str(err)})
    except OSError as err:
        return ConfigRecord({"error": f"cannot read {path} ({err.strerror}): make it readable by the SuperNode's "
                                      "user"})
    names = [str(v) for v in raw]
    digest = hashlib.sha256(json.dumps([texts, names]).encode()).hexdigest()
    return ConfigRecord({"name": Path(path).name, "examples": len(texts), "labels": label_set(names),
                         "fingerprint": digest})


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


def _train(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    task = record_task(content["task"])
    client = node_client(content, node_config)
    _maybe_fault(task)
    with _RUN_LOCK:
        reply, stats = client.fit(task, from_record(content["tensors"]))
    metrics = MetricRecord({"weight": float(reply.weight), **{k: float(v) for k, v in stats.items()}})
    return RecordDict({"tensors": to_record(reply.tensors), "reply": metrics})


def _evaluate(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    task = record_task(content["task"])
    client = node_client(content, node_config)
    received, head = split_head(from_record(content["tensors"]))
    with _RUN_LOCK:
        metrics = client.validate(task.client, unpack(received), head)
    return RecordDict({"reply": MetricRecord({k: float(v) for k, v in metrics.items()})})


def _partition(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """What this node serves: its partition and, with its own data file, what the server may know of that file."""
    i, n = node_partition(node_config)
    known = RecordDict({"partition": ConfigRecord({"partition-id": i, "num-partitions": n})})
    if node_data(node_config):
        known["data"] = data_record(node_data(node_config), str(content["task"]["config"]))
    return known


ANSWERS: dict[str, Callable[[RecordDict, Mapping[str, Any]], RecordDict]] = {
    "train": _train, "evaluate": _evaluate, "query.partition": _partition}


def answer(kind: str, content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """A node's reply content to a message of type ``kind`` (``train``, ``evaluate``, ``query.partition``)."""
    return ANSWERS[kind](content, node_config)


def _reply(msg: Message, context: Context) -> Message:
    return Message(answer(msg.metadata.message_type, msg.content, context.node_config), reply_to=msg)


client_app = ClientApp()
client_app.train()(_reply)
client_app.evaluate()(_reply)
client_app.query("partition")(_reply)


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
        if self._round >= self._last() and not self.exp.policy.validates_after(self._round):
            self.close()
        return out

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, dict[str, float]]:
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
