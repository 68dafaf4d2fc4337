"""Method registry: DESIGN.md §2's names → plug-ins with a server half and a client half."""

from __future__ import annotations

from fedrank.config import ConfigError
from fedrank.methods.base import LocalStart, Method, Reply, Task, Tensors
from fedrank.methods.fedit import FedIT
from fedrank.methods.fedplora import FedPLoRA
from fedrank.methods.ffa import FFALoRA
from fedrank.methods.flexlora import FlexLoRA
from fedrank.methods.flora import FLoRA
from fedrank.methods.hetlora import HetLoRA
from fedrank.methods.orderedfold import OrderedFold
from fedrank.methods.replication import Replication
from fedrank.methods.updatepad import UpdatePad
from fedrank.methods.zeropad import ZeroPad

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FedIT, ZeroPad, HetLoRA, Replication, UpdatePad, OrderedFold, FLoRA, FlexLoRA, FedPLoRA, FFALoRA)
}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method `{name}`: use one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "LocalStart", "Method", "Reply", "Task", "Tensors", "get_method"]
