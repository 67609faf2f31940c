"""A network specialised to the classes a user needs: class-subset CAR against all-class CAR with
the head trimmed, Torch-Pruning's magnitude and Taylor pruning, and the same widths trained from
scratch (`python -m experiments.specialisation`; docs/specialise.md)."""
