"""A package of a user's own, outside dpsgd: a data set (`data.Blobs`) and a model (`nets.TinyMLP`) that a run
names by `_target_`, with their option files in conf/ (README "Your own model or data set")."""
