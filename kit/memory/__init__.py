"""Memory: closed-form estimates and the plans built on them (`estimates`, pure arithmetic, torch-free), apart
from what is measured on the device (`measure`: /proc, cgroups, CUDA, glibc's allocator)."""
