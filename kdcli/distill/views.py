"""The student's view of unlabelled images: the same as the teacher's, or a strongly jittered copy of it.

Semi-supervised detection (Unbiased Teacher, Soft Teacher) shows the teacher a weakly augmented image and the
student a strongly augmented one, so that the student must match the teacher's outputs under noise it will meet.
Geometry stays the same for both views (feature terms compare maps location by location): the strong view is
photometric only (brightness, contrast, saturation, a grey image now and then, Gaussian noise, blur). Draws come
from the global torch generator, which a resumed run restores, so a resume replays them exactly.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
GREY = 0.2  # probability of a grey image
NOISE = 8.0  # Gaussian noise std (0-255 scale), drawn up to this per image
BLUR = 0.5  # probability of a Gaussian blur with sigma in [0.1, 2]


def strong(images: torch.Tensor) -> torch.Tensor:
    """A photometrically jittered copy of [N, 3, H, W] images on the 0-255 scale (float out, same geometry)."""
    x = images.float() / 255
    out = []
    for im in x:
        b, c, s = (1 + JITTER * (2 * torch.rand(3) - 1)).tolist()
        im = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(im, b), c), s)
        if torch.rand(()) < GREY:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if torch.rand(()) < BLUR:
            sigma = float(0.1 + 1.9 * torch.rand(()))
            im = TF.gaussian_blur(im, kernel_size=2 * round(3 * sigma) + 1, sigma=sigma)
        out.append(im)
    x = torch.stack(out)
    noise = NOISE / 255 * torch.rand(len(x), 1, 1, 1, device=x.device) * torch.randn_like(x)
    return (x + noise).clamp(0, 1) * 255
