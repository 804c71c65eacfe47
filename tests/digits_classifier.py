"""A small digits classifier that judges class-conditional samples (issue 5 "Must show": a conditional
``digits-ddpm`` model generates the asked class at least 90% of the time).

It is trained on the same images the model trains on (``open_dataset("digits", resolution=R)``), so
resampling conventions match, with a held-out split whose accuracy is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DigitClassifier:
    model: object
    resolution: int
    holdout_accuracy: float

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``[N, 1, R, R]`` (or ``[N, R, R]``) -> predicted digit ``[N]``."""
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0
        if x.shape[1] != self.resolution**2:
            raise ValueError(f"classifier expects {self.resolution}x{self.resolution} gray images")
        return self.model.predict(x)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


def train_digit_classifier(resolution: int = 16, holdout: float = 0.2, seed: int = 0) -> DigitClassifier:
    """Multinomial logistic regression on the digits data at ``resolution`` (about 97% held-out
    accuracy at 16x16; seconds on one core). The final model is refit on all images."""
    from sklearn.linear_model import LogisticRegression

    from difflab.data import open_dataset

    ds = open_dataset("digits", resolution=resolution, use_labels=True)
    images = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    labels = np.asarray([int(ds[i][1]) for i in range(len(ds))])
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    perm = np.random.default_rng(seed).permutation(len(x))
    n_hold = int(round(holdout * len(x)))
    hold, train = perm[:n_hold], perm[n_hold:]
    clf = LogisticRegression(C=0.5, max_iter=3000)
    clf.fit(x[train], labels[train])
    acc = float((clf.predict(x[hold]) == labels[hold]).mean()) if n_hold else float("nan")
    clf = LogisticRegression(C=0.5, max_iter=3000).fit(x, labels)
    return DigitClassifier(clf, resolution, acc)
