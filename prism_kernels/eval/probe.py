"""Linear probes: logistic regression on standardised features (scikit-learn).
The regularisation strength is chosen by cross-validation on the training
features only; the test set is never seen while fitting."""
from __future__ import annotations

import numpy as np


class LinearProbe:
    def __init__(self, Cs=(0.01, 0.1, 1.0, 10.0), folds: int = 3, seed: int = 0, max_iter: int = 3000):
        self.Cs, self.folds, self.seed, self.max_iter = tuple(Cs), folds, seed, max_iter

    def _select(self, x):
        return x[:, self.keep_]

    def fit(self, x, y) -> "LinearProbe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        # Drop (numerically) constant features: MiniLM's embedding has dimensions that are
        # ~1e-33 for every input; standardising would blow their rounding noise up to O(1).
        std = x.std(0)
        self.keep_ = std > 1e-6 * std.max()
        x = self._select(x)

        def make(C):
            return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=self.max_iter))

        if len(self.Cs) > 1:
            min_class = np.bincount(y).min() if y.dtype.kind in "iu" else self.folds
            folds = max(2, min(self.folds, int(min_class)))
            cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
            scores = [cross_val_score(make(C), x, y, cv=cv).mean() for C in self.Cs]
            self.C_ = self.Cs[int(np.argmax(scores))]
            self.cv_scores_ = dict(zip(self.Cs, map(float, scores)))
        else:
            self.C_ = self.Cs[0]
            self.cv_scores_ = {}
        self.model_ = make(self.C_).fit(x, y)
        return self

    def predict(self, x) -> np.ndarray:
        return self.model_.predict(self._select(np.asarray(x, dtype=np.float64)))

    def score(self, x, y) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())

    def torch_linear(self):
        """The fitted probe (scaler folded in) as a torch.nn.Linear (float32)."""
        import torch

        scaler, lr = self.model_[0], self.model_[-1]
        W = np.zeros((lr.coef_.shape[0], len(self.keep_)))
        W[:, self.keep_] = lr.coef_ / scaler.scale_[None, :]
        b = lr.intercept_ - (lr.coef_ * scaler.mean_ / scaler.scale_).sum(1)
        if W.shape[0] == 1:  # binary: two logits [0, z]
            W = np.concatenate([np.zeros_like(W), W])
            b = np.concatenate([np.zeros(1), b])
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        return lin


class KNNProbe:
    """k-nearest-neighbour classifier on the exact model's training features,
    cosine distance (brute force: a few thousand training points). k is chosen by
    stratified cross-validation on the training features only; ties in the CV
    score go to the smaller k. A second, non-parametric read-out next to the
    linear probe: it scores whether Prism's features stay near the exact
    features of the same class, not only on the right side of a hyperplane."""

    def __init__(self, ks=(5, 10, 20), folds: int = 3, seed: int = 0):
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"KNNProbe: ks must be positive integers, got {ks}")
        self.ks, self.folds, self.seed = ks, folds, seed

    @staticmethod
    def _make(k):
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")

    def fit(self, x, y) -> "KNNProbe":
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        ks = [k for k in self.ks if k <= len(y) * (self.folds - 1) // self.folds] or [min(self.ks)]
        if len(ks) > 1:
            min_class = int(np.bincount(y).min()) if y.dtype.kind in "iu" else self.folds
            cv = StratifiedKFold(max(2, min(self.folds, min_class)), shuffle=True, random_state=self.seed)
            scores = [cross_val_score(self._make(k), x, y, cv=cv).mean() for k in ks]
            self.k_ = ks[int(np.argmax(scores))]
            self.cv_scores_ = dict(zip(ks, map(float, scores)))
        else:
            self.k_, self.cv_scores_ = ks[0], {}
        self.model_ = self._make(self.k_).fit(x, y)
        return self

    def predict(self, x) -> np.ndarray:
        return self.model_.predict(np.asarray(x, dtype=np.float64))

    def score(self, x, y) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())
