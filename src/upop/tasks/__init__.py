"""Task plug-ins. Importing this package registers every built-in task."""

from upop.tasks import caption, classification, nlvr, retrieval, segmentation, vqa  # noqa: F401  (registration)
from upop.tasks.base import Task, TaskOptions, get_task, register_task, registered_tasks, task_class

__all__ = ["Task", "TaskOptions", "get_task", "register_task", "registered_tasks", "task_class"]
