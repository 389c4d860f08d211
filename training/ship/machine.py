"""What a figure was measured on: the CPU model and the load, printed beside every timing."""
import os
import platform
from pathlib import Path


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe():
    """e.g. 'Intel(R) Xeon(R) Processor, 2 cores, load average 0.12'."""
    return f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
