// How deeply a JSON text nests, found without parsing it.
//
// msgspec (like every recursive-descent decoder) relies on the interpreter's recursion limit to stop at
// hostile nesting before the C stack overflows, and libraries raise that limit as a side effect of being
// imported (py_ecc sets 100,000). Stage IR programs come from peers and their schema nests (list
// arguments hold arguments), so their nesting is bounded here first, whatever the limit is.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tl {

// The maximum nesting of arrays and objects in `data`, counting brackets outside strings (escapes
// inside strings honoured). Stops early and returns limit + 1 once the nesting exceeds `limit`.
// Malformed JSON is left to the real decoder: this only bounds depth.
size_t json_depth(const uint8_t* data, size_t n, size_t limit);

}  // namespace tl
