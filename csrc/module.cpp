// Python bindings for tensorlink._C. Everything that touches bulk bytes releases the GIL.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

#include "buffer_pool.h"
#include "checksum.h"
#include "cuda_api.h"
#include "errors.h"
#include "frame_header.h"
#include "frame_io.h"
#include "json_depth.h"
#include "quantize.h"
#include "sealed_socket.h"

namespace py = pybind11;
using namespace tl;

namespace {

// A contiguous view of any buffer-protocol object, held for the duration of a call. Must be destroyed
// with the GIL held, so views are always created and dropped outside gil_scoped_release blocks.
class View {
 public:
  View(const py::handle& obj, bool writable, const char* what) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) {
      PyErr_Clear();
      throw py::type_error(std::string(what) + " must be a contiguous" + (writable ? ", writable" : "") +
                           " buffer (bytes, bytearray, memoryview, numpy array or pool buffer), got " +
                           std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
  }
  ~View() { PyBuffer_Release(&view_); }
  View(const View&) = delete;
  View& operator=(const View&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

std::vector<std::unique_ptr<View>> views_of(const py::sequence& parts, bool writable, std::vector<iovec>* iov) {
  std::vector<std::unique_ptr<View>> views;
  for (const auto& part : parts) {
    views.push_back(std::make_unique<View>(part, writable, "each part"));
    iov->push_back(iovec{views.back()->data(), views.back()->size()});
  }
  return views;
}

// Host memory that another Python object owns (a CPU tensor's storage), exported through the buffer
// protocol. The object is kept alive by the view, so the memory cannot be freed under it. This is the
// cheap way to see a tensor's bytes: torch's own route (detach, reshape, view as uint8, numpy) costs
// about 10 µs of dispatcher calls, as much as sealing and sending a small frame.
struct HostMemory {
  py::object owner;
  uintptr_t address;
  size_t nbytes;
};

// Runs with the GIL released; on EINTR it takes the GIL to let Python raise KeyboardInterrupt.
void check_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

void check_block(size_t block) {
  if (block == 0 || block > kMaxBlockSize)
    throw WireError("int8 block size " + std::to_string(block) + " is outside 1.." + std::to_string(kMaxBlockSize));
}

// Seconds from a Python timeout argument: None waits forever (-1), otherwise a number >= 0.
double timeout_or_forever(const py::object& timeout) {
  if (timeout.is_none()) return -1.0;
  if (!PyFloat_Check(timeout.ptr()) && !PyLong_Check(timeout.ptr()))
    throw py::type_error("timeout must be a number of seconds or None");
  double t = timeout.cast<double>();
  if (!(t >= 0)) throw py::value_error("timeout must be >= 0 seconds or None");
  return t;
}

// One deadline for a call made of several waits: what is left of it, or -1 for no deadline.
class Deadline {
 public:
  explicit Deadline(double timeout_s)
      : forever_(timeout_s < 0),
        end_(std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                    std::chrono::duration<double>(forever_ ? 0.0 : timeout_s))) {}
  double left() const {
    if (forever_) return -1.0;
    return std::max(0.0, std::chrono::duration<double>(end_ - std::chrono::steady_clock::now()).count());
  }

 private:
  bool forever_;
  std::chrono::steady_clock::time_point end_;
};

FrameHeader make_header(uint8_t dtype, const std::vector<int64_t>& shape, uint8_t compression, uint32_t block_size,
                        uint64_t payload_len, uint32_t payload_crc, const py::bytes& job, uint64_t step,
                        uint32_t micro_batch, uint32_t stage) {
  FrameHeader h;
  if (shape.size() > static_cast<size_t>(kMaxNdim))
    throw WireError("ndim " + std::to_string(shape.size()) + " exceeds the maximum of " + std::to_string(kMaxNdim));
  std::string job_bytes = job;
  if (job_bytes.size() != 16) throw WireError("job id must be 16 bytes, got " + std::to_string(job_bytes.size()));
  h.dtype = dtype;
  h.ndim = static_cast<uint8_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) h.shape[i] = shape[i];
  h.compression = compression;
  h.block_size = block_size;
  h.payload_len = payload_len;
  h.payload_crc = payload_crc;
  std::memcpy(h.job, job_bytes.data(), 16);
  h.step = step;
  h.micro_batch = micro_batch;
  h.stage = stage;
  return h;
}

std::string header_repr(const FrameHeader& h) {
  const DTypeInfo* d = dtype_info(h.dtype);
  std::string shape = "(";
  for (int i = 0; i < h.ndim; ++i) shape += std::to_string(h.shape[i]) + (h.ndim == 1 || i + 1 < h.ndim ? "," : "");
  shape += ")";
  const char* c = compression_name(h.compression);
  return std::string("FrameHeader(dtype=") + (d ? d->name : "?") + ", shape=" + shape + ", compression=" +
         (c ? c : "?") + ", payload_len=" + std::to_string(h.payload_len) + ", step=" + std::to_string(h.step) +
         ", micro_batch=" + std::to_string(h.micro_batch) + ", stage=" + std::to_string(h.stage) + ")";
}

// The two direction keys, which must have the same AES-GCM size (16 or 32 bytes).
std::pair<std::string, std::string> key_pair(const py::bytes& send_key, const py::bytes& recv_key) {
  std::string s = send_key, r = recv_key;
  if ((s.size() != kSealKey128 && s.size() != kSealKey256) || r.size() != s.size())
    throw py::value_error("send_key and recv_key must both be 16 bytes (AES-128-GCM) or both 32 bytes "
                          "(AES-256-GCM), got " + std::to_string(s.size()) + " and " + std::to_string(r.size()));
  return {s, r};
}

// SealedSocket plus the Python buffer of the frame being sent, held until the last byte is out.
struct PySealedSocket {
  PySealedSocket(int fd, const std::pair<std::string, std::string>& keys, std::shared_ptr<BufferPool> pool,
                 uint64_t max_payload, bool verify_crc)
      : sock(fd, reinterpret_cast<const uint8_t*>(keys.first.data()),
             reinterpret_cast<const uint8_t*>(keys.second.data()), keys.first.size(), std::move(pool), max_payload,
             verify_crc) {}
  SealedSocket sock;
  std::unique_ptr<View> payload;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "TensorLink native core: frame header codec, CRC32C, int8 quantization, buffer pool, socket I/O.";

  auto wire_error = py::register_exception<WireError>(m, "WireError", PyExc_ValueError);
  py::register_exception<ChecksumError>(m, "ChecksumError", wire_error.ptr());
  py::register_exception<PoolExhausted>(m, "PoolExhausted", PyExc_TimeoutError);
  auto closed = py::register_exception<ConnectionClosed>(m, "ConnectionClosed", PyExc_ConnectionError);
  py::register_exception<AuthError>(m, "AuthError", wire_error.ptr());
  py::register_exception<ChannelBroken>(m, "ChannelBroken", closed.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TimeoutExpired& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const std::system_error& e) {
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());
    }
  });

  m.attr("HEADER_SIZE") = kHeaderSize;
  m.attr("MAX_NDIM") = kMaxNdim;
  m.attr("FRAME_VERSION") = kFrameVersion;
  m.attr("MAX_BLOCK_SIZE") = kMaxBlockSize;
  m.attr("TINY_ABSMAX") = kTinyAbsmax;

  m.def("dtype_table", [] {
    size_t n;
    const DTypeInfo* t = dtype_table(&n);
    py::list out;
    for (size_t i = 0; i < n; ++i)
      out.append(py::make_tuple(t[i].name, static_cast<int>(t[i].code), t[i].itemsize, t[i].floating));
    return out;
  }, "The fixed dtype table: (torch name, code, itemsize, is floating) per entry.");
  m.def("compression_table", [] {
    py::dict out;
    for (int c = 0; c < 256; ++c)
      if (const char* name = compression_name(static_cast<uint8_t>(c))) out[py::str(name)] = c;
    return out;
  }, "Compression kinds and their codes.");

  py::class_<FrameHeader>(m, "FrameHeader", "A decoded, validated tensor frame header.")
      .def(py::init(&make_header), py::kw_only(), py::arg("dtype"), py::arg("shape"), py::arg("compression") = 0,
           py::arg("block_size") = 0, py::arg("payload_len"), py::arg("payload_crc") = 0,
           py::arg("job") = py::bytes(std::string(16, '\0')), py::arg("step") = 0, py::arg("micro_batch") = 0,
           py::arg("stage") = 0)
      .def_readonly("dtype", &FrameHeader::dtype)
      .def_readonly("compression", &FrameHeader::compression)
      .def_readonly("block_size", &FrameHeader::block_size)
      .def_readonly("payload_len", &FrameHeader::payload_len)
      .def_readonly("payload_crc", &FrameHeader::payload_crc)
      .def_readonly("step", &FrameHeader::step)
      .def_readonly("micro_batch", &FrameHeader::micro_batch)
      .def_readonly("stage", &FrameHeader::stage)
      .def_property_readonly("job", [](const FrameHeader& h) {
        return py::bytes(reinterpret_cast<const char*>(h.job), 16);
      })
      .def_property_readonly("shape", [](const FrameHeader& h) {
        py::tuple t(h.ndim);
        for (int i = 0; i < h.ndim; ++i) t[i] = h.shape[i];
        return t;
      })
      .def_property_readonly("numel", &FrameHeader::numel)
      .def("__repr__", &header_repr);

  m.def("encode_header", [](const FrameHeader& h, uint64_t max_payload) {
    uint8_t out[kHeaderSize];
    encode_header(h, out, max_payload);
    return py::bytes(reinterpret_cast<const char*>(out), kHeaderSize);
  }, py::arg("header"), py::arg("max_payload"), "Validate and encode a header to HEADER_SIZE bytes.");
  m.def("decode_header", [](const py::handle& buf, uint64_t max_payload) {
    View v(buf, false, "header");
    return decode_header(v.data(), v.size(), max_payload);
  }, py::arg("data"), py::arg("max_payload"),
        "Decode and validate the first HEADER_SIZE bytes of data; raises WireError naming what is wrong.");

  m.def("crc32c", [](const py::handle& buf, uint32_t crc) {
    View v(buf, false, "data");
    py::gil_scoped_release nogil;
    return tl::crc32c(crc, v.data(), v.size());
  }, py::arg("data"), py::arg("crc") = 0, "CRC32C of data, continuing from crc.");
  m.def("crc32c_portable", [](const py::handle& buf, uint32_t crc) {
    View v(buf, false, "data");
    py::gil_scoped_release nogil;
    return tl::crc32c_portable(crc, v.data(), v.size());
  }, py::arg("data"), py::arg("crc") = 0, "CRC32C on the portable table path (for tests).");
  m.def("crc32c_hardware", &crc32c_uses_hardware, "Whether CRC32C runs on the SSE4.2 instruction.");

  m.def("quantize_int8", [](const py::handle& src, size_t block, const py::handle& scales, const py::handle& q) {
    View x(src, false, "src"), s(scales, true, "scales"), out(q, true, "q");
    check_block(block);
    if (x.size() % 4) throw WireError("src must hold float32 values (length divisible by 4)");
    size_t n = x.size() / 4, nblocks = n / block + (n % block != 0);
    if (s.size() < nblocks * 4 || out.size() < n) throw WireError("scales or q output buffer too small");
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = tl::quantize_int8(reinterpret_cast<const float*>(x.data()), n, block, reinterpret_cast<float*>(s.data()),
                              reinterpret_cast<int8_t*>(out.data()));
    }
    if (bad >= 0)
      throw WireError("cannot int8-quantize non-finite values (NaN or infinity) in block " + std::to_string(bad) +
                      " (elements " + std::to_string(bad * block) + ".." +
                      std::to_string(std::min<size_t>((bad + 1) * block, n) - 1) + ")");
  }, py::arg("src"), py::arg("block"), py::arg("scales"), py::arg("q"),
        "Blockwise absmax int8 quantization of float32 src into scales (float32) and q (int8).");
  m.def("dequantize_int8", [](const py::handle& q, const py::handle& scales, size_t block, const py::handle& dst) {
    View in(q, false, "q"), s(scales, false, "scales"), out(dst, true, "dst");
    check_block(block);
    size_t n = in.size(), nblocks = n / block + (n % block != 0);
    if (s.size() < nblocks * 4 || out.size() < n * 4) throw WireError("scales or dst buffer too small");
    py::gil_scoped_release nogil;
    tl::dequantize_int8(reinterpret_cast<const int8_t*>(in.data()), reinterpret_cast<const float*>(s.data()), n, block,
                        reinterpret_cast<float*>(out.data()));
  }, py::arg("q"), py::arg("scales"), py::arg("block"), py::arg("dst"), "Inverse of quantize_int8 into float32 dst.");

  py::class_<HostMemory>(m, "HostMemory", py::buffer_protocol(),
                         "Bytes at an address owned by another object (see host_memory).")
      .def_buffer([](HostMemory& h) {
        return py::buffer_info(reinterpret_cast<void*>(h.address), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(h.nbytes)}, {1}, /*readonly=*/false);
      });
  m.def("json_depth", [](const py::handle& data, size_t limit) {
    View v(data, false, "data");
    py::gil_scoped_release nogil;  // released before v is destroyed (reverse order), so v drops with the GIL
    return json_depth(v.data(), v.size(), limit);
  }, py::arg("data"), py::arg("limit"),
        "Maximum nesting of arrays/objects in a JSON text (brackets outside strings), without parsing it; "
        "limit + 1 as soon as it exceeds limit. Bounds hostile nesting before a recursive decoder sees it.");
  m.def("host_memory", [](uintptr_t address, size_t nbytes, py::object owner) {
    if (nbytes > 0 && address == 0) throw py::value_error("host_memory: null address for a non-empty region");
    return py::memoryview(py::cast(HostMemory{std::move(owner), address, nbytes}));
  }, py::arg("address"), py::arg("nbytes"), py::arg("owner"),
        "A writable memoryview of nbytes at address, keeping owner alive. Only for memory that owner holds "
        "contiguously in host RAM (a contiguous CPU tensor: address=data_ptr(), nbytes=nbytes); the caller "
        "vouches for that, nothing here can check it.");

  py::class_<PooledBuffer>(m, "PooledBuffer", py::buffer_protocol(),
                           "A writable page-aligned buffer from a BufferPool; it returns to the pool when the last "
                           "reference to it (tensors built over it included) is gone.")
      .def_buffer([](PooledBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {1}, /*readonly=*/false);
      })
      .def_property_readonly("nbytes", &PooledBuffer::nbytes)
      .def_property_readonly("capacity", &PooledBuffer::capacity)
      .def_property_readonly("pinned", &PooledBuffer::pinned)
      .def_property_readonly("address", [](const PooledBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def("__len__", &PooledBuffer::nbytes);

  py::class_<BufferPool, std::shared_ptr<BufferPool>>(m, "BufferPool",
                                                      "Reusable page-aligned host buffers with a hard byte cap.")
      .def(py::init(&BufferPool::create), py::arg("capacity"), py::arg("pin") = true)
      .def("acquire", [](BufferPool& p, size_t nbytes, const py::object& timeout) {
        double t = timeout_or_forever(timeout);
        py::gil_scoped_release nogil;
        return p.acquire(nbytes, t);
      }, py::arg("nbytes"), py::arg("timeout") = py::none(),
           "A buffer of nbytes; waits up to timeout seconds (None: forever) while the pool is full.")
      .def("trim", &BufferPool::trim, "Free cached buffers nobody holds.")
      .def_property_readonly("capacity", &BufferPool::capacity)
      .def_property_readonly("in_use", &BufferPool::in_use_bytes)
      .def_property_readonly("cached", &BufferPool::cached_bytes)
      .def_property_readonly("pinned", &BufferPool::pinned)
      .def_static("size_class", &BufferPool::size_class);

  m.def("send_parts", [](int fd, const py::sequence& parts, const py::object& timeout) {
    std::vector<iovec> iov;
    auto views = views_of(parts, false, &iov);
    double t = timeout_or_forever(timeout);
    py::gil_scoped_release nogil;
    send_all(fd, iov, t, check_signals);
  }, py::arg("fd"), py::arg("parts"), py::arg("timeout") = py::none(),
        "Write every byte of parts to the socket fd with gathered writes.");
  m.def("recv_into", [](int fd, const py::sequence& parts, const py::object& timeout) {
    std::vector<iovec> iov;
    auto views = views_of(parts, true, &iov);
    double t = timeout_or_forever(timeout);
    py::gil_scoped_release nogil;
    recv_all(fd, iov, t, check_signals);
  }, py::arg("fd"), py::arg("parts"), py::arg("timeout") = py::none(),
        "Fill every byte of parts from the socket fd with scattered reads.");
  m.def("recv_frame", [](int fd, std::shared_ptr<BufferPool> pool, uint64_t max_payload, const py::object& timeout,
                         bool verify) {
    Deadline deadline(timeout_or_forever(timeout));
    py::gil_scoped_release nogil;
    uint8_t raw[kHeaderSize];
    recv_all(fd, {iovec{raw, kHeaderSize}}, deadline.left(), check_signals);
    FrameHeader h = decode_header(raw, kHeaderSize, max_payload);  // validated before any allocation
    std::unique_ptr<PooledBuffer> buf = pool->acquire(h.payload_len, deadline.left());
    recv_all(fd, {iovec{buf->data(), h.payload_len}}, deadline.left(), check_signals);
    if (verify && tl::crc32c(0, buf->data(), h.payload_len) != h.payload_crc)
      throw ChecksumError("payload checksum mismatch (corrupted in transit) in " + header_repr(h));
    return std::make_pair(h, std::move(buf));
  }, py::arg("fd"), py::arg("pool"), py::arg("max_payload"), py::arg("timeout") = py::none(), py::arg("verify") = true,
        "Read one whole frame: header (validated against max_payload before allocating), then the payload "
        "into a pool buffer, checksum verified; timeout bounds the whole call. Returns (FrameHeader, PooledBuffer).");

  m.attr("SEAL_CHUNK") = kSealChunk;
  m.attr("SEAL_TAG") = kSealTag;
  m.attr("SEAL_READ_AHEAD") = kReadAhead;
  py::class_<PySealedSocket>(m, "SealedSocket",
                             "AES-GCM tensor frames over a connected TCP socket (see csrc/sealed_socket.h); 16-byte keys select "
                             "AES-128-GCM, 32-byte keys AES-256-GCM. The "
                             "pumps release the GIL; one sender and one receiver may pump at the same time.")
      .def(py::init([](int fd, const py::bytes& send_key, const py::bytes& recv_key, std::shared_ptr<BufferPool> pool,
                       uint64_t max_payload, bool verify_crc) {
             return std::make_unique<PySealedSocket>(fd, key_pair(send_key, recv_key), std::move(pool), max_payload,
                                                     verify_crc);
           }),
           py::arg("fd"), py::arg("send_key"), py::arg("recv_key"), py::arg("pool"), py::arg("max_payload"),
           py::arg("verify_crc") = true)
      .def("start_send", [](PySealedSocket& s, const py::bytes& header, const py::handle& payload) {
        std::string h = header;
        if (h.size() != kHeaderSize) throw WireError("an encoded frame header is " + std::to_string(kHeaderSize) + " bytes");
        auto view = std::make_unique<View>(payload, false, "payload");
        s.sock.start_send(reinterpret_cast<const uint8_t*>(h.data()), view->data(), view->size());
        s.payload = std::move(view);
      }, py::arg("header"), py::arg("payload"), "Queue one encoded frame; pump_send moves it.")
      .def("pump_send", [](PySealedSocket& s, bool blocking, const py::object& timeout) {
        double t = timeout_or_forever(timeout);
        bool done;
        try {
          py::gil_scoped_release nogil;
          done = s.sock.pump_send(blocking, t, check_signals);
        } catch (...) {
          if (s.sock.broken()) s.payload.reset();
          throw;
        }
        if (done) s.payload.reset();
        return done;
      }, py::arg("blocking"), py::arg("timeout") = py::none(),
           "Move bytes of the queued frame; True once all of it is on the socket. Non-blocking calls return "
           "False when the socket is full; blocking ones wait up to timeout (None: forever).")
      .def("pump_recv", [](PySealedSocket& s, bool blocking, const py::object& timeout, uint64_t max_inline) {
        double t = timeout_or_forever(timeout);
        py::gil_scoped_release nogil;
        return static_cast<int>(s.sock.pump_recv(blocking, t, check_signals, max_inline));
      }, py::arg("blocking"), py::arg("timeout") = py::none(), py::arg("max_inline") = UINT64_MAX,
           "Move bytes of the incoming frame: 0 needs more data, 1 a frame is ready (take_frame), 2 the pool "
           "is full (only without blocking). Without blocking, a header announcing more than max_inline "
           "payload bytes returns 0 at once (see incoming) so the payload can be moved in a thread.")
      .def_property_readonly("incoming", [](const PySealedSocket& s) { return s.sock.incoming(); },
                             "Payload bytes of the frame being received once its header is in, else 0.")
      .def_property_readonly("header", [](const PySealedSocket& s) {
        const FrameHeader* h = s.sock.header();
        return h ? py::cast(*h) : py::object(py::none());
      }, "The validated FrameHeader of the frame being received once it is in (its payload may still be "
         "unread: pump with max_inline=0 to stop at every header), else None.")
      .def("take_frame", [](PySealedSocket& s) {
        auto [h, buf] = s.sock.take_frame();
        return py::make_tuple(h, buf ? py::cast(std::move(buf)) : py::none());
      }, "The received frame: (FrameHeader, PooledBuffer or None for an empty payload).")
      .def("shutdown", [](PySealedSocket& s, const std::string& why) { s.sock.shutdown(why); }, py::arg("why"),
           "Break the channel: blocked pumps fail at once; the owner closes the fd afterwards.")
      .def_property_readonly("sending", [](const PySealedSocket& s) { return s.sock.sending(); })
      .def_property_readonly("receiving", [](const PySealedSocket& s) { return s.sock.receiving(); })
      .def_property_readonly("broken", [](const PySealedSocket& s) {
        return s.sock.broken() ? py::object(py::str(s.sock.broken_reason())) : py::object(py::none());
      }, "Why the channel broke, or None.")
      .def_property_readonly("bytes_sent", [](const PySealedSocket& s) { return s.sock.bytes_sent(); })
      .def_property_readonly("bytes_received", [](const PySealedSocket& s) { return s.sock.bytes_received(); })
      .def_property_readonly("frames_sent", [](const PySealedSocket& s) { return s.sock.frames_sent(); })
      .def_property_readonly("frames_received", [](const PySealedSocket& s) { return s.sock.frames_received(); });

  m.def("cuda_compiled", [] { return cuda::kCompiled; }, "Whether the CUDA sources were built in.");
  m.def("cuda_available", &cuda::available, "Whether a CUDA device is usable (compiled in and present).");
#ifdef TENSORLINK_WITH_CUDA
  m.def("cuda_quantize_int8", [](uintptr_t x, size_t n, size_t block, uintptr_t scales, uintptr_t q, uintptr_t stream) {
    check_block(block);
    cuda::quantize_int8(reinterpret_cast<const float*>(x), n, block, reinterpret_cast<float*>(scales),
                        reinterpret_cast<int8_t*>(q), stream);
  }, py::arg("x"), py::arg("n"), py::arg("block"), py::arg("scales"), py::arg("q"), py::arg("stream"),
        "Enqueue blockwise int8 quantization of n float32 values at device pointer x on stream.");
  m.def("cuda_dequantize_int8", [](uintptr_t q, uintptr_t scales, size_t n, size_t block, uintptr_t out, uintptr_t stream) {
    check_block(block);
    cuda::dequantize_int8(reinterpret_cast<const int8_t*>(q), reinterpret_cast<const float*>(scales), n, block,
                          reinterpret_cast<float*>(out), stream);
  }, py::arg("q"), py::arg("scales"), py::arg("n"), py::arg("block"), py::arg("out"), py::arg("stream"),
        "Enqueue the inverse of cuda_quantize_int8 on stream.");
#endif
}
