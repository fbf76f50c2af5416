#include "buffer_pool.h"

#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

#include "cuda_api.h"
#include "errors.h"

namespace tl {

constexpr size_t kPage = 4096;

PooledBuffer::~PooledBuffer() { pool_->give_back(ptr_, capacity_); }

std::shared_ptr<BufferPool> BufferPool::create(size_t capacity_bytes, bool pin) {
  return std::shared_ptr<BufferPool>(new BufferPool(capacity_bytes, pin && cuda::available()));
}

BufferPool::~BufferPool() { trim(); }

// Quarter steps between powers of two, in whole pages: at most 25 % of a buffer is slack, and buffers
// of nearly the same size (activations of one stage) share a class.
size_t BufferPool::size_class(size_t nbytes) {
  if (nbytes <= kPage) return kPage;
  if (nbytes > (size_t{1} << 62)) throw std::length_error("buffer request of " + std::to_string(nbytes) + " bytes is absurd");
  size_t top = size_t{1} << (63 - __builtin_clzll(nbytes - 1));  // largest power of two < nbytes
  size_t step = top >= 4 * kPage ? top / 4 : kPage;
  return (nbytes + step - 1) / step * step;
}

void* BufferPool::allocate(size_t cls) {
  void* p = std::aligned_alloc(kPage, cls);
  if (!p) throw std::bad_alloc();
  if (pin_ && !cuda::host_register(p, cls)) {
    std::free(p);
    throw std::runtime_error("cudaHostRegister failed for a " + std::to_string(cls) + "-byte buffer");
  }
  return p;
}

void BufferPool::free_block(void* ptr, size_t) {
  if (pin_) cuda::host_unregister(ptr);
  std::free(ptr);
}

bool BufferPool::evict_until_fits(size_t cls, std::vector<std::pair<void*, size_t>>* victims) {
  for (auto it = free_.begin(); in_use_ + cached_ + reserved_ + cls > capacity_ && it != free_.end();) {
    while (!it->second.empty() && in_use_ + cached_ + reserved_ + cls > capacity_) {
      victims->emplace_back(it->second.back(), it->first);
      it->second.pop_back();
      cached_ -= it->first;
    }
    it = it->second.empty() ? free_.erase(it) : std::next(it);
  }
  return in_use_ + cached_ + reserved_ + cls <= capacity_;
}

std::unique_ptr<PooledBuffer> BufferPool::acquire(size_t nbytes, double timeout_s) {
  if (nbytes > capacity_ || size_class(nbytes) > capacity_)
    throw PoolExhausted("a " + std::to_string(nbytes) + "-byte buffer can never fit a pool of " +
                        std::to_string(capacity_) + " bytes");
  const size_t cls = size_class(nbytes);
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s < 0 ? 1e9 : timeout_s));
  // Cached buffers evicted to make room are freed after the lock is dropped, on every way out.
  std::vector<std::pair<void*, size_t>> victims;
  struct FreeVictims {
    BufferPool* pool;
    std::vector<std::pair<void*, size_t>>* v;
    ~FreeVictims() {
      for (auto& [p, c] : *v) pool->free_block(p, c);
    }
  } free_victims{this, &victims};

  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto hit = free_.find(cls);
    if (hit != free_.end() && !hit->second.empty()) {
      void* p = hit->second.back();
      hit->second.pop_back();
      cached_ -= cls;
      in_use_ += cls;
      return std::make_unique<PooledBuffer>(shared_from_this(), p, nbytes, cls, pin_);
    }
    if (evict_until_fits(cls, &victims)) break;
    if (std::chrono::steady_clock::now() >= deadline)
      throw PoolExhausted("buffer pool full: " + std::to_string(in_use_) + " of " + std::to_string(capacity_) +
                          " bytes in use and nothing came back in time");
    returned_.wait_until(lock, deadline);
  }
  reserved_ += cls;  // counted against the cap while we allocate without the lock
  lock.unlock();
  void* p = nullptr;
  try {
    p = allocate(cls);
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    reserved_ -= cls;
    returned_.notify_all();
    throw;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    reserved_ -= cls;
    in_use_ += cls;
  }
  return std::make_unique<PooledBuffer>(shared_from_this(), p, nbytes, cls, pin_);
}

void BufferPool::give_back(void* ptr, size_t cls) {
  {
    std::lock_guard<std::mutex> g(mu_);
    in_use_ -= cls;
    cached_ += cls;
    free_[cls].push_back(ptr);
  }
  returned_.notify_all();
}

void BufferPool::trim() {
  std::map<size_t, std::vector<void*>> drop;
  {
    std::lock_guard<std::mutex> g(mu_);
    drop.swap(free_);
    cached_ = 0;
  }
  for (auto& [cls, ptrs] : drop)
    for (void* p : ptrs) free_block(p, cls);
}

size_t BufferPool::in_use_bytes() {
  std::lock_guard<std::mutex> g(mu_);
  return in_use_;
}

size_t BufferPool::cached_bytes() {
  std::lock_guard<std::mutex> g(mu_);
  return cached_;
}

}  // namespace tl
