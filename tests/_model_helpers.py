"""Random model weights for the tests (one definition for every test file that needs them)."""

import torch


def randomize(model, std=0.15):
    """Non-zero random weights everywhere except the fixed position table; returns the model in eval mode.

    DiT's own init zeroes adaLN and the output layers, which would make most equalities trivial.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, std)
    return model.eval()
