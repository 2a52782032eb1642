"""The tasks, one file per family (GLUE, SQuAD, your own text data, generation, token classification), their
interface (`base.py`) and their registry (`registry.py`), re-exported here: `Task`, `register_task`, `get_task`,
`available_tasks`...

Each task file registers its tasks with `tasks.registry` when imported; this package imports them all below.
"""

from __future__ import annotations

from adalora_cli.tasks.base import (TRUNCATED_INPUT, TRUNCATED_TARGET, DatasetSettings, EvalSplit, Task, TaskSettings,
                                    UserDataTask, encode_counting_cuts, setting, take_truncation)
from adalora_cli.tasks.registry import (available_tasks, get_task, prediction_formats, register_task,
                                        setting_default, settings_classes, tasks_with_setting)
from adalora_cli.tasks import glue, squad, text, generation, ner  # noqa: F401  (each registers its tasks)

__all__ = ["TRUNCATED_INPUT", "TRUNCATED_TARGET", "DatasetSettings", "EvalSplit", "Task", "TaskSettings",
           "UserDataTask", "available_tasks", "encode_counting_cuts", "get_task", "prediction_formats",
           "register_task", "setting", "setting_default", "settings_classes", "take_truncation", "tasks_with_setting"]
