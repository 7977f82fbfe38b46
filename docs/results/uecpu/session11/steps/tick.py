import time, threading
ON = [False]
T = {}
_last = [0.0]
def tk(label=None):
    """label None: start; else add time since last tick to label."""
    if not ON[0] or threading.current_thread() is not threading.main_thread():
        return
    now = time.thread_time()
    if label is not None:
        T[label] = T.get(label, 0.0) + now - _last[0]
    _last[0] = time.thread_time()
