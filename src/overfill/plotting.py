"""What every figure shares: matplotlib on the Agg backend (files only, no display) and one colour per row."""

from __future__ import annotations

COLORS = {"overfill": "tab:green", "full": "tab:blue", "pruned": "tab:orange", "hf_generate": "tab:gray",
          "hf_assisted": "tab:purple", "overfill+compiled": "darkgreen", "full+compiled": "navy",
          "pruned+compiled": "saddlebrown"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
