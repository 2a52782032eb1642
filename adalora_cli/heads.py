"""Names of the task-head modules, in a module of their own below `models`, `inject` and `export`, which all read
them: loading a model (which tasks do) then does not import the adapter methods."""

# Modules that belong to the task head: they train with every method and are saved with the adapter.
# (A pooler trains too when the checkpoint lacks it, as DeBERTa's does: see models.load_model.)
HEAD_MODULES = ("classifier", "score", "qa_outputs")
