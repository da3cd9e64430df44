"""Floor 5: the Gradio app; it calls only `composer`."""
