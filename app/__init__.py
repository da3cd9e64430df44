"""Floor 5: the Gradio app (Compose, Library and Analyze tabs); it calls only `composer`.

Start it with ``compose app --library DIR`` or ``python -m app --library DIR``; :func:`app.server.start` runs it
inside another program (tests, notebooks).
"""
