"""Multi-query associative recall (MQAR): softmax, TaylorShift and linear attention compared."""
