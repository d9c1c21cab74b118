"""Serving built artifacts into an application that was not written against aitune_build.load().

`aitune-build run -- python app.py` (or `AUTOWRAPT_BOOTSTRAP=aitune_build` with `AITUNE_MANIFEST`) starts the
application with a hook (bootstrap.py) that watches the modules defining the classes of `serve = true` targets;
when one is imported, hook.py checks the target is up to date and patches the class's forward so that each
instance whose parameters match the built weights calls the artifact. `aitune-build record -- python app.py`
starts it with recorder.py instead, which notes the inputs each chosen module receives; manifest_edit.py writes
them into aitune.toml. Nothing here imports torch before the application does.
"""
