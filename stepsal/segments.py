"""The three segments of a reasoning trace, as the integers every layer of stepsal uses.

Torch-free, so that views, options and the command line can name segments without importing
the computation modules.
"""

QUESTION, THINKING, SUMMARY = 0, 1, 2
SEGMENT_NAMES = ("question", "thinking", "summary")
