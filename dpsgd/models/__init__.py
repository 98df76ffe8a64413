"""Models, and the flat view of their parameters that sharing puts on the wire."""
