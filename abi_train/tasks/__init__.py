"""Task registry: the only place that maps ``cfg.task`` to family-specific code."""

from __future__ import annotations

from importlib import import_module

from abi_train.errors import UserError
from abi_train.tasks.base import Task

# name -> "module:Class"; imported lazily so an LLM run never imports image code.
TASKS = {
    "llm": "abi_train.tasks.llm:LLMTask",
    "vit": "abi_train.tasks.vit:ViTTask",
    "clip": "abi_train.tasks.clip:CLIPTask",
    "sft": "abi_train.tasks.sft:SFTTask",
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)
