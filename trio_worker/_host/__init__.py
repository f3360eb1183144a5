"""Host mechanisms: cgroup drivers, block devices, inotify, namespaces.

Nothing here knows what a job is.
"""
