"""A package laid out the QTasks way: tasks in modules that never import the app (docs/examples/routers.py)."""
