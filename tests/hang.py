"""The one time limit of the suite: it catches a hung process, never a slow machine.

Tests wait on events (a process exit, a marker a paused trainer writes), so their duration depends on the
machine; a limit only guards against a deadlock. It is long on purpose: a loaded 2-core CI runner can be
several times slower than an idle laptop, and a test that fails from load alone blocks every landing.
"""
HANG_S = 3600
