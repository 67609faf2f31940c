"""Studies that reproduce figures (`make real`, `make rgb`, the colour and global-vs-magnitude
studies), one sub-folder each, run as `python -m experiments.NAME`. They read data and models
only through carprune's public API, as a user's script would."""
