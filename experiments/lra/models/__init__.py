"""Encoder classifiers with pluggable attention (TaylorShift or softmax)."""

from .classifiers import PairClassifier, SequenceClassifier, build_model

__all__ = ["PairClassifier", "SequenceClassifier", "build_model"]
