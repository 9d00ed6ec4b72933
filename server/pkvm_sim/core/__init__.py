"""The simulation core: pure Python, no gRPC and no metrics.

One module per kernel object: `vmemmap` (struct hyp_page array), `hyp_pool` (the buddy
allocator), `physmem` (sparse page contents), `reservation` (the host's carve-out
arithmetic), the stage-2 page tables and VMs, and `hypervisor` (the booted machine that ties
them together behind one lock-free API; the service serialises calls into it).
"""
