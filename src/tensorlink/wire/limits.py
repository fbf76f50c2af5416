"""Size caps applied before anything is allocated for data from a peer."""

# Largest tensor payload a frame may declare unless the caller passes its own cap. Big enough for a
# 2 GiB activation, small enough that a forged header cannot make a node allocate without bound.
MAX_FRAME_PAYLOAD = 4 << 30
DEFAULT_INT8_BLOCK = 4096
