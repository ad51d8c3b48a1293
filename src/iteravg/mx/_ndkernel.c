/* Put many MXNet NDArrays back into the default (row-major) layout in one call and report their data pointers.
 *
 * Why: MXNet's oneDNN build reorders Conv / FullyConnected / Deconvolution weights *in place* into a blocked
 * layout during an inference-mode forward (``MKLDNNDataReorderAsync``). A numpy view of the parameter's memory
 * then reads and writes bytes in the wrong order. ``MXNDArrayGetData`` reorders a oneDNN array back to the
 * default layout (in its own buffer) before returning the pointer, so calling it on every parameter right
 * before numpy touches them makes the views valid again -- and tells us if a buffer moved.
 *
 * Why C: a ctypes loop costs ~0.5 us per array (1 ms for 2000 tensors, 25x a fold); this is one ctypes call
 * per step. MXNDArrayGetData is passed in as a function pointer, so nothing links against libmxnet.
 * No Python API is used (loaded with ctypes).
 */
#include <stdint.h>

typedef int (*iteravg_getdata_fn)(void *handle, void **out_pdata);

/* For each of the n handles: out[i] = its data pointer after reordering to the default layout.
 * Returns the number of i with out[i] != expected[i] (expected may be NULL: then 0), or -1 - i when the
 * MXNet call failed for handle i (MXGetLastError() has the message). */
int64_t iteravg_mx_default_layout(int64_t n, void *const *handles, const uintptr_t *expected, uintptr_t *out,
                                  void *getdata) {
  iteravg_getdata_fn fn = (iteravg_getdata_fn)getdata;
  int64_t moved = 0;
  for (int64_t i = 0; i < n; ++i) {
    void *p = 0;
    if (fn(handles[i], &p) != 0) return -1 - i;
    out[i] = (uintptr_t)p;
    if (expected && out[i] != expected[i]) ++moved;
  }
  return moved;
}
