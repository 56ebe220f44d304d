"""What a child process that measures its own memory runs first (``load_memory.py``, ``bench_7b.py`` and the
streaming tests start such children with ``python -c``):

    CHILD = MEMORY_SAMPLER + r'''
    ...imports...
    base_anon = status("RssAnon:")
    start_sampler()
    ...the load...
    print(peak_anon[0] - base_anon, status("VmHWM:"))
    '''

``status(key)`` is a line of /proc/self/status in bytes (``VmRSS:``, ``VmHWM:``, ``RssAnon:``). ``start_sampler(every_s)``
polls ``RssAnon``, which has no kernel high-water mark, from a daemon thread into ``peak_anon[0]``; above
``$BENCH_MAX_ANON_GB`` GiB the child stops with exit status 3 and says so (a shared machine: before the kernel's
OOM killer picks someone). A string to prepend rather than a module to import: the children run anywhere, and
what they import before their baseline is part of what some of them measure.
"""

MEMORY_SAMPLER = r"""
import os, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
peak_anon = [0]
def start_sampler(every_s=0.002):
    limit = float(os.environ.get("BENCH_MAX_ANON_GB", "inf")) * 2**30
    def sample():
        while True:
            peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
            if peak_anon[0] > limit:
                print(f"stopped: anonymous memory passed {limit / 2**30:.1f} GiB", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(every_s)
    threading.Thread(target=sample, daemon=True).start()
"""
