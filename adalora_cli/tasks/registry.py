"""The task registry: `register_task`, `get_task`, `available_tasks`.

Registration runs one way: each task file imports this module and registers its tasks; the package's __init__
imports this module and then the task files. Nothing here imports a task file.
"""

from __future__ import annotations

from adalora_cli.errors import UserError
from adalora_cli.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"duplicate task {task.name!r}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(available_tasks())}") from None


def available_tasks() -> list[str]:
    return sorted(_TASKS)
