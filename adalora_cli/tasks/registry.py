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


def settings_classes() -> list[type]:
    """Every registered task family's settings class, once each, in registration order (for the command line)."""
    return list(dict.fromkeys(task.settings_class for task in _TASKS.values()))


def tasks_with_setting(name: str) -> list[str]:
    """The registered tasks that have a setting `name`."""
    from dataclasses import fields

    return [task.name for task in _TASKS.values() if name in {f.name for f in fields(task.settings_class)}]


def prediction_formats() -> list[str]:
    """Every `adalora predict --format` some task writes."""
    return list(dict.fromkeys(fmt for task in _TASKS.values() for fmt in task.prediction_formats))


def setting_default(name: str):
    """The default of the task setting `name` (that of the first task family that has it)."""
    from dataclasses import fields

    for cls in settings_classes():
        for f in fields(cls):
            if f.name == name:
                return f.default
    raise KeyError(name)
