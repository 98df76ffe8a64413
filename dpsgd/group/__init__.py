"""Node groups: many nodes per rank, their models the rows of one tensor."""
