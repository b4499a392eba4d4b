"""One module per claim; each writes CSV/JSON numbers and PNG figures into an output directory."""
