"""How messages move: one transport per communication pattern, for any grouping of nodes.

`rounds.RoundTransport` carries synchronous rounds (D-PSGD, epidemic, resampled graphs),
`walks.WalkTransport` random walks (RWM). Both hand a message to a node of the same rank in
memory and send it to another rank over gloo isend/irecv; `base.Transport` holds what they
share: which nodes this rank hosts, their byte counters, header checks and failure verdicts.
"""
