"""The two scenarios a stream runs in (see `ntkcl.methods.base` for what each means to a method)."""

CLASS_INCREMENTAL = "class-incremental"
TASK_INCREMENTAL = "task-incremental"
SCENARIOS = (CLASS_INCREMENTAL, TASK_INCREMENTAL)
