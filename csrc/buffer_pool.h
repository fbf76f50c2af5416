// A pool of reusable, page-aligned host buffers with a hard cap on the bytes it holds.
//
// Frames are received into these buffers and tensors are built over them without a copy, so a buffer
// goes back to the pool only when the last Python reference to it (the tensor included) is gone. When a
// GPU is present the buffers are page-locked once, at allocation, so copies to and from the device can
// be asynchronous. A full pool makes acquire() wait: that is the data plane's backpressure.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace tl {

class BufferPool;

class PooledBuffer {
 public:
  PooledBuffer(std::shared_ptr<BufferPool> pool, void* ptr, size_t nbytes, size_t capacity, bool pinned)
      : pool_(std::move(pool)), ptr_(ptr), nbytes_(nbytes), capacity_(capacity), pinned_(pinned) {}
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;
  ~PooledBuffer();

  void* data() const { return ptr_; }
  size_t nbytes() const { return nbytes_; }      // what was asked for; the buffer view's length
  size_t capacity() const { return capacity_; }  // the size class actually held
  bool pinned() const { return pinned_; }

 private:
  std::shared_ptr<BufferPool> pool_;
  void* ptr_;
  size_t nbytes_, capacity_;
  bool pinned_;
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // pin: page-lock buffers when a CUDA device is present (ignored otherwise).
  static std::shared_ptr<BufferPool> create(size_t capacity_bytes, bool pin);
  ~BufferPool();

  // A buffer of at least nbytes. Waits up to timeout_s (negative: forever) for other buffers to come
  // back when the cap is reached; throws PoolExhausted after that, or at once if nbytes > capacity.
  std::unique_ptr<PooledBuffer> acquire(size_t nbytes, double timeout_s);

  // Frees cached buffers that nobody holds.
  void trim();

  size_t capacity() const { return capacity_; }
  size_t in_use_bytes();
  size_t cached_bytes();
  bool pinned() const { return pin_; }
  static size_t size_class(size_t nbytes);

 private:
  BufferPool(size_t capacity_bytes, bool pin) : capacity_(capacity_bytes), pin_(pin) {}
  friend class PooledBuffer;
  void give_back(void* ptr, size_t cls);
  void* allocate(size_t cls);
  void free_block(void* ptr, size_t cls);
  bool evict_until_fits(size_t cls, std::vector<std::pair<void*, size_t>>* victims);

  const size_t capacity_;
  const bool pin_;
  std::mutex mu_;
  std::condition_variable returned_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> cached buffers
  size_t in_use_ = 0, cached_ = 0, reserved_ = 0;
};

}  // namespace tl
