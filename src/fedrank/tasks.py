"""Learning tasks: what the model learns, and how a task loads, encodes, trains and scores it.

A task (config key ``task``) is the one place where the classifier path and the causal-LM
paths differ; the training loop, evaluation, experiment building and export go through it.

- ``classify``: a sequence classifier (encoder + fresh head); cross-entropy over the labels.
- ``generate-label``: a causal LM reads ``data.prompt_template`` with the text filled in and
  answers `` <label word>``; the loss covers the answer tokens only; accuracy picks the label
  word the model finds most likely (no free-running generation).
- ``instruct``: a causal LM on prompt/response JSONL pairs in the model's chat template; the
  loss covers the response tokens only; evaluation reports loss and perplexity.

Causal losses never materialise full-vocabulary logits at positions without loss: hidden states
come from the decoder, the positions with loss are selected, and only they go through
``lm_head``; label scoring applies ``lm_head`` rows of the label words only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from peft import PeftModel
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import Tensor, nn
from torch.nn import functional as F

from fedrank.adapters import default_lora_targets
from fedrank.compute import Compute
from fedrank.config import NODES, ConfigError
from fedrank.data import Splits, TextDataset, load_splits, utf8_lines
from fedrank.export import CARD, training_card
from fedrank.headline import ACCURACY, PERPLEXITY, Headline

if TYPE_CHECKING:
    from fedrank.config import Config
    from fedrank.models import LoadedModel


# --------------------------------------------------------------------------- encoded examples


@dataclass(frozen=True)
class Encoded:
    """Token ids (unpadded, truncated) and labels of a dataset.

    Causal tasks also give ``starts``: the index in ``ids`` of each example's first answer
    token (the loss covers ``ids[start:]``).  ``task`` is the task that encoded them
    (``None`` = classify), so evaluation needs nothing else.
    """

    ids: list[list[int]]
    labels: list[int]
    starts: list[int] | None = None
    task: LearningTask | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Encoded:
        starts = None if self.starts is None else [self.starts[i] for i in indices]
        return Encoded([self.ids[i] for i in indices], [self.labels[i] for i in indices], starts, self.task)


def collate(data: Encoded, indices: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """Dynamic padding (right): pad to the longest example in this batch only.

    With ``starts``, ``loss_mask[b, t]`` is True where token ``t`` is an answer token.
    """
    width = max(len(data.ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = data.ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([data.labels[i] for i in indices])}
    if data.starts is not None:
        starts = torch.tensor([data.starts[i] for i in indices])
        batch["loss_mask"] = (torch.arange(width)[None, :] >= starts[:, None]) & mask.bool()
        batch["starts"] = starts
    return batch


def length_sorted_batches(data: Encoded, batch_size: int) -> list[list[int]]:
    """Evaluation batches of similar length, to save padding."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def classification_metrics(confusion: Tensor, loss_sum: float, n: int) -> dict[str, float]:
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp_min(1)
    recall = tp / confusion.sum(1).clamp_min(1)
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros_like(tp))
    present = confusion.sum(1) > 0
    return {
        "accuracy": float(tp.sum() / max(1, n)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": loss_sum / max(1, n),
    }


def score_classes(scores: Callable[[dict[str, Tensor]], Tensor], batches: Iterator[dict[str, Tensor]], n: int,
                  k: int) -> dict[str, float]:
    """Accuracy, macro-F1 and cross-entropy of per-class ``scores(batch)`` (logits) over the ``n`` examples of
    ``batches``; the loss is computed in fp32 whatever the autocast precision."""
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum = 0.0
    for batch in batches:
        logits = scores(batch).float()
        labels = batch["labels"]
        loss_sum += F.cross_entropy(logits, labels).item() * len(labels)
        pred = logits.argmax(-1).cpu()
        confusion.index_put_((labels.cpu(), pred), torch.ones_like(pred), accumulate=True)
    return classification_metrics(confusion, loss_sum, n)


# --------------------------------------------------------------------------- causal LM pieces


def causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder returning hidden states, lm_head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, nn.Module]:
    decoder, head = causal_parts(model)
    h = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return h, head


def answer_nll(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of the answer tokens' negative log-likelihoods, number of answer tokens).

    Position ``t`` predicts token ``t+1``; only positions whose next token is an answer token
    go through ``lm_head``.
    """
    h, head = hidden_states(model, batch)
    target = batch["loss_mask"][:, 1:]
    logits = head(h[:, :-1][target]).float()
    return F.cross_entropy(logits, batch["input_ids"][:, 1:][target], reduction="sum"), int(target.sum())


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean negative log-likelihood per answer token of the batch."""
    total, count = answer_nll(model, batch)
    return total / max(1, count)


# --------------------------------------------------------------------------- the tasks


class LearningTask:
    """What a run trains the model to do.  Subclasses set the class attributes and methods.

    ``compute`` (the config's ``device`` and ``precision``) is where the task's model lives and how its forward
    passes run; without a config it is CPU fp32.
    """

    name: ClassVar[str]
    causal: ClassVar[bool]
    peft_task_type: ClassVar[str | None]  # PEFT task_type of the exported adapter
    headline: ClassVar[Headline]  # the metric a run is summarised by; also behind `score`

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg
        self.compute = Compute.of(cfg.device, cfg.precision) if cfg else Compute()
        self.default_targets: list[str] = []  # set by `load_model` from the model's architecture
        self.default_heads: list[str] = []

    # -- configuration
    @property
    def target_modules(self) -> list[str]:
        """``model.target_modules``, or PEFT's default LoRA targets for the loaded model's architecture."""
        return list(self.cfg.model.target_modules if self.cfg and self.cfg.model.target_modules
                    else self.default_targets)

    @property
    def head_modules(self) -> list[str]:
        return list(self.cfg.model.head_modules if self.cfg and self.cfg.model.head_modules else self.default_heads)

    # -- data and model
    def load_data(self) -> Splits:
        return load_splits(self.cfg.data, self.cfg.seed)

    def load_model(self, label_names: Sequence[str]) -> LoadedModel:
        """The task's model on ``compute.device``, checked against ``train.max_length``, with gradient
        checkpointing when asked for; it remembers its architecture's default LoRA targets and head."""
        loaded = self._load(label_names)
        model, cfg = loaded.model, self.cfg
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and cfg.train.max_length > positions:
            raise ConfigError(f"train.max_length={cfg.train.max_length} exceeds the {positions} positions of model "
                              f"`{cfg.model.name}`: set train.max_length ≤ {positions}")
        if not cfg.model.target_modules:
            self.default_targets = default_lora_targets(model)
        self.default_heads = self.heads_of(model)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        setattr(model, CARD, training_card(cfg, label_names, self.target_modules, self.compute.precision))
        model.to(self.compute.device)
        return loaded

    def _load(self, label_names: Sequence[str]) -> LoadedModel:
        raise NotImplementedError

    def heads_of(self, model: nn.Module) -> list[str]:
        """The model's modules that form the task head (trained in full)."""
        return []

    def encode(self, dataset: TextDataset) -> Encoded:
        raise NotImplementedError

    # -- training and evaluation
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def batches(self, data: Encoded, batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
        """Evaluation batches of similar length, on the device."""
        for indices in length_sorted_batches(data, batch_size):
            yield self.compute.to(collate(data, indices, pad_id))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                 num_labels: int | None = None) -> dict[str, float]:
        """The task's metrics of ``model`` (on ``compute.device``) over ``data``, under autocast."""
        with self.compute.autocast():
            return self.metrics(model, data, batch_size, pad_id, num_labels)

    def metrics(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                num_labels: int | None) -> dict[str, float]:
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        """A client's validation score (higher is better), e.g. for the quality rank policy: the headline
        metric, negated when lower is better."""
        return self.headline.gain(metrics[self.headline.key])


class Classify(LearningTask):
    """Sequence classification with an encoder and a fresh classifier head (the original path)."""

    name, causal, peft_task_type, headline = "classify", False, None, ACCURACY

    def _load(self, label_names: Sequence[str]) -> LoadedModel:
        from fedrank.models import load_classifier

        loaded = load_classifier(self.cfg.model.name, len(label_names), self.cfg.seed)
        self.tokenizer, self.num_labels = loaded.tokenizer, len(label_names)
        return loaded

    def heads_of(self, model: nn.Module) -> list[str]:
        """The classification head: ``classifier`` (encoders) or ``score`` (causal LMs), as PEFT names them."""
        return [name for name in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]

    def encode(self, dataset: TextDataset) -> Encoded:
        ids = self.tokenizer(list(dataset.texts), truncation=True, max_length=self.cfg.train.max_length)["input_ids"]
        return Encoded(ids, list(dataset.labels), None, self)

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def metrics(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                num_labels: int | None) -> dict[str, float]:
        k = num_labels or getattr(self, "num_labels", None) or max(data.labels, default=0) + 1
        return score_classes(lambda batch: self.logits(model, batch), self.batches(data, batch_size, pad_id),
                             len(data), k)


class CausalTask(LearningTask):
    causal, peft_task_type = True, "CAUSAL_LM"

    def _load(self, label_names: Sequence[str]) -> LoadedModel:
        from fedrank.models import load_causal_lm

        loaded = load_causal_lm(self.cfg.model.name, self.cfg.seed)
        self.tokenizer = loaded.tokenizer
        self.bind(label_names)
        return loaded

    def bind(self, label_names: Sequence[str]) -> None:
        """Prepare what encoding needs, once the tokenizer is known."""

    def tokens(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return answer_loss(model, batch)


class GenerateLabel(CausalTask):
    """The causal LM completes the prompt with the label word; scored by label-word likelihood."""

    name, headline = "generate-label", ACCURACY

    def bind(self, label_names: Sequence[str]) -> None:
        words = list(self.cfg.data.label_words) or list(label_names)
        if len(words) != len(label_names):
            raise ConfigError(f"data.label_words has {len(words)} words for {len(label_names)} labels "
                              f"({', '.join(label_names)}): give one word per label, in this order")
        template = self.cfg.data.prompt_template
        if template.count("{text}") != 1:
            raise ConfigError("data.prompt_template must contain `{text}` exactly once, e.g. \"Text: {text}\\nLabel:\"")
        self.prefix, self.suffix = template.split("{text}")
        self.set_candidates([self.tokens(" " + w.strip()) for w in words])

    def set_candidates(self, candidates: list[list[int]]) -> None:
        """The answer token ids of each label; first-token scoring when their first tokens differ."""
        if len({tuple(c) for c in candidates}) != len(candidates) or not all(candidates):
            raise ConfigError("two labels have the same (or an empty) answer word: set distinct data.label_words")
        self.candidates = candidates
        self.first_token_scoring = len({c[0] for c in candidates}) == len(candidates)

    def encode(self, dataset: TextDataset) -> Encoded:
        prefix, suffix = self.tokens(self.prefix, special=True), self.tokens(self.suffix)
        room = self.cfg.train.max_length - len(prefix) - len(suffix) - max(map(len, self.candidates))
        if room < 1:
            raise ConfigError(f"train.max_length={self.cfg.train.max_length} leaves no room for the text after the "
                              "prompt template and the label word: raise train.max_length")
        texts = self.tokenizer([" " + t.strip() for t in dataset.texts], add_special_tokens=False)["input_ids"]
        ids, starts = [], []
        for text, label in zip(texts, dataset.labels):
            prompt = prefix + text[:room] + suffix
            ids.append(prompt + self.candidates[label])
            starts.append(len(prompt))
        return Encoded(ids, list(dataset.labels), starts, self)

    def label_scores(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """[batch, labels] log-likelihood scores of each label's answer given the prompt.

        First-token scoring (label words with distinct first tokens): the ``lm_head`` rows of the
        first tokens at the last prompt position, one forward pass; the argmax equals that of the
        first token's log-probability.  Otherwise the full log-likelihood of every label's tokens,
        one forward pass per label, with ``lm_head`` applied at the answer positions only.
        """
        starts = batch["starts"]
        device = starts.device
        rows = torch.arange(len(starts), device=device)
        if self.first_token_scoring:  # causal attention: the answer tokens cannot affect the prompt's states
            h, head = hidden_states(model, batch)
            last = h[rows, starts - 1]
            first = torch.tensor([c[0] for c in self.candidates], device=device)
            bias = head.bias[first] if getattr(head, "bias", None) is not None else 0.0
            return last @ head.weight[first].T + bias
        scores = []
        for cand in self.candidates:
            L = len(cand)
            width = int(starts.max()) + L
            answer = torch.tensor(cand, device=device)
            ids = torch.zeros(len(starts), width, dtype=torch.long, device=device)
            att = torch.zeros_like(ids)
            for b, s in enumerate(starts.tolist()):
                ids[b, :s] = batch["input_ids"][b, :s]
                ids[b, s : s + L] = answer
                att[b, : s + L] = 1
            h, head = hidden_states(model, {"input_ids": ids, "attention_mask": att})
            pos = starts[:, None] - 1 + torch.arange(L, device=device)[None, :]  # positions predicting the answer
            logp = F.log_softmax(head(h[rows[:, None], pos]).float(), -1)
            scores.append(logp.gather(-1, answer.expand(len(starts), L)[..., None]).squeeze(-1).sum(-1))
        return torch.stack(scores, -1)

    def metrics(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                num_labels: int | None) -> dict[str, float]:
        """Accuracy and macro-F1 of the most likely label word; loss = cross-entropy over the labels' scores."""
        return score_classes(lambda batch: self.label_scores(model, batch), self.batches(data, batch_size, pad_id),
                             len(data), len(self.candidates))


@dataclass(frozen=True)
class PairDataset(TextDataset):
    """Prompts (``texts``) with their reference ``responses``; labels are all 0."""

    responses: list[str] = field(default_factory=list)

    def subset(self, indices: Sequence[int]) -> PairDataset:
        return PairDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names,
                           [self.responses[i] for i in indices])


def load_pairs(path: Path, prompt_field: str, response_field: str, test_fraction: float, seed: int,
               max_train: int = 0) -> Splits:
    """Prompt/response records of a JSONL file; a seeded ``test_fraction`` of them is test."""
    if not path.is_file() or path.suffix != ".jsonl":
        raise ConfigError(f"instruct data {path} not found: pass an existing .jsonl file of prompt/response "
                          "records as data.dataset")
    prompts, responses = [], []
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {lineno} is not valid JSON ({err.msg}): fix or remove it") from None
        for key, name in (("prompt_field", prompt_field), ("response_field", response_field)):
            if not isinstance(record, dict) or not isinstance(record.get(name), str):
                raise ConfigError(f"{path} line {lineno} has no string field `{name}`: set data.{key}")
        prompts.append(record[prompt_field])
        responses.append(record[response_field])
    n = len(prompts)
    if n < 2:
        raise ConfigError(f"{path} has {n} record(s): an instruct run needs at least 2")
    order = np.random.default_rng([seed, 0]).permutation(n)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    test, train = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    if 0 < max_train < len(train):
        train = sorted(np.random.default_rng([seed, 1]).choice(train, max_train, replace=False).tolist())
    data = PairDataset(prompts, [0] * n, ["response"], responses)
    return Splits(data.subset(train), data.subset(test))


class Instruct(CausalTask):
    """Supervised fine-tuning on prompt/response pairs in the model's chat template."""

    name, headline = "instruct", PERPLEXITY

    def load_data(self) -> Splits:
        d = self.cfg.data
        if d.dataset == NODES:
            raise ConfigError(f"task=instruct cannot train on node-local data (data.dataset = {NODES}) yet: use a "
                              "label task (classify, generate-label)")
        return load_pairs(Path(d.dataset), d.prompt_field, d.response_field, d.test_fraction, self.cfg.seed,
                          d.max_train_examples)

    def _prompt_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{prompt}\n"

    def encode(self, dataset: TextDataset) -> Encoded:
        if not isinstance(dataset, PairDataset):
            raise ConfigError("task=instruct needs a .jsonl file of prompt/response records as data.dataset")
        limit = self.cfg.train.max_length
        ids, starts = [], []
        for prompt, response in zip(dataset.texts, dataset.responses):
            p = self.tokens(self._prompt_text(prompt), special=True)
            r = self.tokens(response) + [self.tokenizer.eos_token_id]
            r = r[: max(limit - len(p), limit // 2)]
            p = p[max(0, len(p) + len(r) - limit):]  # keep the end of a long prompt (the assistant header)
            ids.append(p + r)
            starts.append(len(p))
        return Encoded(ids, list(dataset.labels), starts, self)

    def metrics(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                num_labels: int | None) -> dict[str, float]:
        """Mean negative log-likelihood per response token over the whole split, and its perplexity."""
        total, count = 0.0, 0
        for batch in self.batches(data, batch_size, pad_id):
            nll, n = answer_nll(model, batch)
            total, count = total + nll.item(), count + n
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}

    def score(self, metrics: dict[str, float]) -> float:
        """Minus the loss: a lower loss is a better client (it orders as perplexity does, without its cap)."""
        return -metrics["loss"]


TASKS: dict[str, type[LearningTask]] = {t.name: t for t in (Classify, GenerateLabel, Instruct)}


def make_task(cfg: Config) -> LearningTask:
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task `{cfg.task}`: use one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)


def task_of(data: Encoded) -> LearningTask:
    """The task that encoded ``data`` (classify when it was built by hand)."""
    return data.task if data.task is not None else Classify()

