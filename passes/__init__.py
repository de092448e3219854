"""The rewrite passes: one module per pass, its file name equal to its NAME, with one entry point `run`
(fxslim.recipe.registry lists them by file name and imports one on first use). A helper module that is not a
pass starts with an underscore."""
