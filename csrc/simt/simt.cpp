// The scheduler of the SIMT layer (csrc/simt/simt.h): blocks, their threads as Boost.Context
// fibers, barriers, warp operations, shared memory and the checks a GPU does not make.
//
// One launch runs on the calling thread. For each block (in a seeded shuffled order) it creates
// one fiber per thread on pooled stacks and resumes, round robin, every thread that can go on,
// until all have exited; a round in which none could go on is a deadlock and raises. A thread
// that must wait (at a barrier, or at a warp operation its mask's lanes have not all reached)
// yields to the scheduler; the thread that completes the operation marks the others runnable and
// goes on. Fiber switches cost about 6 ns with Boost.Context's fcontext and 230 ns with ucontext
// (benchmarks/simt_context_switch.cpp), hence fcontext. The AddressSanitizer build
// (PFC_FAST_SIMT_ASAN=1, PFC_SIMT_ASAN) tells ASan about every switch between stacks. A block that
// fails is torn down by resuming each unfinished thread with an Abort that unwinds its stack.
#include "simt.h"

#include <boost/context/fiber.hpp>
#include <sys/mman.h>
#ifdef PFC_SIMT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace pfc_simt {
namespace {

namespace ctx = boost::context;

constexpr std::size_t kStackBytes = 512 << 10;  // CUDA's most local memory per thread (mapped as used)
constexpr unsigned long long kMaxBlocks = 1ull << 24;  // the grids this layer emulates

std::mutex engine_mutex;  // launches from several host threads draw their block orders in turn
std::mt19937_64 block_order_engine(0x5eed);
std::atomic<std::uint64_t> total_launches{0}, total_blocks{0}, total_threads{0}, total_switches{0};

// Fiber stacks, reused across blocks and launches; each has a guard page below it, so an
// overflow faults instead of overwriting a neighbour.
class StackPool {
 public:
  ctx::stack_context take() {
    void* top;
    if (free_.empty()) {
      const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
      void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED || mprotect(base, page, PROT_NONE) != 0) throw std::bad_alloc();
      top = static_cast<char*>(base) + page + kStackBytes;
    } else {
      top = free_.back();
      free_.pop_back();
    }
    ctx::stack_context stack;
    stack.sp = top;
    stack.size = kStackBytes;
    return stack;
  }
  void give(const ctx::stack_context& stack) { free_.push_back(stack.sp); }

 private:
  std::vector<void*> free_;
};

// The StackAllocator that Boost.Context copies into each fiber; it notes the stack it handed out.
struct PooledStack {
  StackPool* pool;
  ctx::stack_context* given;
  ctx::stack_context allocate() { return *given = pool->take(); }
  void deallocate(ctx::stack_context& stack) { pool->give(stack); }
};

// Thrown in the threads of a failed block, to unwind them.
struct Abort {};

thread_local StackPool stack_pool;

enum class Wait { none, barrier, warp, exited };

struct Thread {
  ctx::fiber fiber;  // this thread
  ctx::fiber sink;   // the scheduler, while this thread runs
  ctx::stack_context stack;
  void* asan_fake_stack;
  uint3 idx;
  unsigned lane, warp;
  bool runnable;
  Wait wait;
  Site site;  // where it waits
  std::uint64_t received;
};

// One warp operation that some lanes of its mask have reached.
struct PendingOp {
  Site site;
  WarpOp op;
  unsigned mask, arrived;
  std::uint64_t value[32];
  unsigned arg[32];
  int width[32];
};

struct Warp {
  unsigned lanes;   // the lanes this block has in the warp
  unsigned exited;  // lanes that have returned
  std::vector<PendingOp> pending;
};

struct SharedVariable {
  const void* key;  // the declaration (see PFC_SHARED)
  std::unique_ptr<unsigned char[]> memory;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::idx: return "__shfl_sync";
    case WarpOp::up: return "__shfl_up_sync";
    case WarpOp::down: return "__shfl_down_sync";
    case WarpOp::bfly: return "__shfl_xor_sync";
  }
  return "?";
}

std::string where(const Site& site) {
  std::string file = site.file;
  const auto slash = file.find_last_of('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return std::string(site.what) + " at " + file + ":" + std::to_string(site.line);
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

std::string lanes_text(unsigned lanes) {
  std::ostringstream text;
  bool first = true;
  for (int lane = 0; lane < 32;) {
    if (!(lanes >> lane & 1u)) {
      ++lane;
      continue;
    }
    int last = lane;
    while (last + 1 < 32 && (lanes >> (last + 1) & 1u)) ++last;
    text << (first ? "" : ",") << lane;
    if (last > lane) text << "-" << last;
    first = false;
    lane = last + 1;
  }
  return first ? std::string("none") : text.str();
}

std::string mask_text(unsigned mask) {
  std::ostringstream text;
  text << "0x" << std::hex << mask;
  return text.str();
}

class Block {
 public:
  Block(const LaunchConfig& config, const std::function<void()>& body) : config_(config), body_(body) {
    const dim3 b = config.block;
    const unsigned count = b.x * b.y * b.z;
    threads_.resize(count);
    warps_.resize((count + 31) / 32);
    for (unsigned t = 0; t < count; ++t) {
      Thread& thread = threads_[t];
      thread.idx = uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
      thread.lane = t % 32;
      thread.warp = t / 32;
      warps_[thread.warp].lanes |= 1u << thread.lane;
    }
    dynamic_.reset(new unsigned char[std::max<std::size_t>(config.shared_bytes, 1)]);  // 16-byte aligned
  }

  // Runs the block to its end (blockIdx is set by the caller), resuming its threads round robin
  // from thread `first` (drawn with the block order, so that which thread runs ahead varies).
  void run(unsigned first) {
    std::memset(dynamic_.get(), 0xff, config_.shared_bytes);  // what a block finds in shared memory: NaN, -1
    live_ = static_cast<unsigned>(threads_.size());
    for (Thread& thread : threads_) {
      thread.runnable = true;
      thread.wait = Wait::none;
      thread.fiber = ctx::fiber(std::allocator_arg, PooledStack{&stack_pool, &thread.stack},
                                [this, &thread](ctx::fiber&& scheduler) { return enter(thread, std::move(scheduler)); });
    }
    const std::size_t count = threads_.size();
    for (;;) {
      bool progressed = false;
      for (std::size_t k = 0, t = first % count; k < count; ++k, t = t + 1 == count ? 0 : t + 1) {
        Thread& thread = threads_[t];
        if (!thread.runnable) continue;
        resume(thread);
        ++switches_;
        progressed = true;
        if (error_) abort_block();
      }
      if (live_ == 0) break;
      if (!progressed) {
        error_ = std::make_exception_ptr(Error(deadlock_text()));
        abort_block();
      }
    }
    reset();
  }

  std::uint64_t switches() const { return switches_; }

  void syncthreads(const Site& site) {
    Thread& self = *current_;
    for (const PendingOp& op : warps_[self.warp].pending) {
      if (op.mask >> self.lane & 1u) {
        fail("thread " + thread_text(self) + " reached " + where(site) + " while lanes " + lanes_text(op.arrived) +
             " of its warp wait for it in " + where(op.site) + " (mask " + mask_text(op.mask) + ")");
      }
    }
    if (barrier_waiting_ > 0 && !same_site(barrier_site_, site)) {
      fail("threads of block " + block_text() + " wait at different barriers: " + std::to_string(barrier_waiting_) +
           " at " + where(barrier_site_) + ", thread " + thread_text(self) + " at " + where(site) +
           " (a GPU hangs or mixes them up; every live thread must reach the same __syncthreads)");
    }
    barrier_site_ = site;
    ++barrier_waiting_;
    if (barrier_waiting_ == live_) {
      release_barrier();
      return;
    }
    wait(Wait::barrier, site);
  }

  std::uint64_t warp_exchange(const Site& site, WarpOp op, unsigned mask, std::uint64_t value, unsigned arg, int width) {
    Thread& self = *current_;
    Warp& warp = warps_[self.warp];
    const unsigned bit = 1u << self.lane;
    if (!(mask & bit)) {
      fail(where(site) + " in thread " + thread_text(self) + ": its mask " + mask_text(mask) +
           " does not include the calling lane " + std::to_string(self.lane));
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      fail(where(site) + ": width must be a power of 2 from 1 to 32, got " + std::to_string(width));
    }
    const bool shuffle = op != WarpOp::sync;
    if (shuffle && (mask & ~warp.lanes)) {
      fail(where(site) + " in warp " + std::to_string(self.warp) + " of block " + block_text() + ": mask " +
           mask_text(mask) + " names lanes " + lanes_text(mask & ~warp.lanes) + " that this block of " +
           std::to_string(threads_.size()) + " threads does not have (what a shuffle reads from them is undefined)");
    }
    if (shuffle && (mask & warp.exited)) {
      fail(where(site) + " in warp " + std::to_string(self.warp) + " of block " + block_text() + ": mask " +
           mask_text(mask) + " names lanes " + lanes_text(mask & warp.exited) +
           " that have exited (what a shuffle reads from them is undefined)");
    }
    PendingOp* pending = nullptr;
    for (PendingOp& other : warp.pending) {
      if (!(other.mask & mask)) continue;
      if (other.mask != mask || other.op != op || (shuffle && !same_site(other.site, site))) {
        fail("lanes of warp " + std::to_string(self.warp) + " of block " + block_text() + " diverged: lanes " +
             lanes_text(other.arrived) + " wait in " + where(other.site) + " (mask " + mask_text(other.mask) +
             "), lane " + std::to_string(self.lane) + " reached " + where(site) + " (mask " + mask_text(mask) + ")");
      }
      pending = &other;
    }
    if (pending == nullptr) {
      // A lane of the mask already waiting at a barrier never comes (one that goes there later
      // is caught by syncthreads).
      for (unsigned lane = 0; lane < 32; ++lane) {
        if (!((mask & warp.lanes) >> lane & 1u)) continue;
        const Thread* other = lane_thread(self.warp, lane);
        if (other->wait == Wait::barrier) {
          fail(where(site) + " in warp " + std::to_string(self.warp) + " of block " + block_text() + ": lane " +
               std::to_string(lane) + " of mask " + mask_text(mask) + " waits at " + where(other->site));
        }
      }
      warp.pending.push_back(PendingOp{site, op, mask, 0, {}, {}, {}});
      pending = &warp.pending.back();
    }
    pending->value[self.lane] = value;
    pending->arg[self.lane] = arg;
    pending->width[self.lane] = width;
    pending->arrived |= bit;
    if (!complete(warp, *pending)) {
      wait(Wait::warp, site);
      return self.received;
    }
    finish(self.warp, warp, pending - warp.pending.data(), &self);
    return self.received;
  }

  // Whether every lane the operation waits for has arrived: for __syncwarp the mask's lanes that
  // exist and have not exited, for a shuffle all of the mask's lanes.
  static bool complete(const Warp& warp, const PendingOp& op) {
    const unsigned waited = op.op == WarpOp::sync ? op.mask & warp.lanes & ~warp.exited : op.mask;
    return (op.arrived & waited) == waited;
  }

  // Completes pending operation `index` of warp `w`: every arrived lane's result, by the PTX
  // pseudocode of shfl.sync, and the waiting lanes (all but `self`) made runnable.
  void finish(unsigned w, Warp& warp, std::ptrdiff_t index, const Thread* self) {
    const PendingOp& done = warp.pending[static_cast<std::size_t>(index)];
    for (unsigned lane = 0; lane < 32; ++lane) {
      if (!(done.arrived >> lane & 1u)) continue;
      const unsigned b = done.arg[lane] & 31u;
      const unsigned first = lane & ~unsigned(done.width[lane] - 1);
      const unsigned last = first + unsigned(done.width[lane]) - 1;
      unsigned source = lane;
      switch (done.op) {
        case WarpOp::sync: break;
        case WarpOp::idx: source = first | (b & unsigned(done.width[lane] - 1)); break;
        case WarpOp::up: if (lane >= first + b) source = lane - b; break;
        case WarpOp::down: if (lane + b <= last) source = lane + b; break;
        case WarpOp::bfly: if ((lane ^ b) <= last) source = lane ^ b; break;
      }
      if (!(done.mask >> source & 1u)) {
        fail(where(done.site) + " in warp " + std::to_string(w) + " of block " + block_text() + ": lane " +
             std::to_string(lane) + " reads lane " + std::to_string(source) + ", which is not in the mask " +
             mask_text(done.mask) + " (its value is undefined)");
      }
      Thread& receiver = *lane_thread(w, lane);
      receiver.received = done.value[source];
      if (&receiver != self) {
        receiver.runnable = true;
        receiver.wait = Wait::none;
      }
    }
    warp.pending.erase(warp.pending.begin() + index);
  }

  void* static_shared(const void* key, const Site& site, std::size_t bytes, std::size_t align) {
    for (SharedVariable& variable : shared_) {
      if (variable.key == key) return variable.memory.get();
    }
    if (align > alignof(std::max_align_t)) fail(where(site) + ": alignment over 16 bytes is not supported");
    static_bytes_ += bytes;
    check_shared_total(site);
    SharedVariable variable{key, std::unique_ptr<unsigned char[]>(new unsigned char[std::max<std::size_t>(bytes, 1)])};
    std::memset(variable.memory.get(), 0xff, bytes);
    shared_.push_back(std::move(variable));
    return shared_.back().memory.get();
  }

  void* dynamic() const { return dynamic_.get(); }

 private:
  // The scheduler's side of a switch to `thread` and back.
  void resume(Thread& thread) {
    current_ = &thread;
    threadIdx = thread.idx;
#ifdef PFC_SIMT_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, static_cast<char*>(thread.stack.sp) - thread.stack.size,
                                   thread.stack.size);
#endif
    thread.fiber = std::move(thread.fiber).resume();
#ifdef PFC_SIMT_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  }

  // The thread's side: after it gains control, and before it gives control back (for good when finished).
  void arrived(Thread& thread) {
#ifdef PFC_SIMT_ASAN
    __sanitizer_finish_switch_fiber(thread.asan_fake_stack, &scheduler_stack_bottom_, &scheduler_stack_size_);
#endif
  }
  void leaving(Thread& thread, bool finished) {
#ifdef PFC_SIMT_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &thread.asan_fake_stack, scheduler_stack_bottom_,
                                   scheduler_stack_size_);
#endif
  }

  ctx::fiber enter(Thread& thread, ctx::fiber&& scheduler) {
    thread.sink = std::move(scheduler);
    arrived(thread);
    try {
      if (!aborting_) body_();
    } catch (const Abort&) {
    } catch (...) {
      if (!error_) error_ = std::current_exception();
    }
    if (!aborting_) exit(thread);
    leaving(thread, true);
    return std::move(thread.sink);
  }

  void exit(Thread& thread) {
    thread.runnable = false;
    thread.wait = Wait::exited;
    --live_;
    Warp& warp = warps_[thread.warp];
    warp.exited |= 1u << thread.lane;
    for (std::size_t index = 0; index < warp.pending.size();) {
      const PendingOp& op = warp.pending[index];
      if (!(op.mask >> thread.lane & 1u) || error_) {
        ++index;
      } else if (op.op != WarpOp::sync) {
        error_ = std::make_exception_ptr(
            Error("SIMT: lane " + std::to_string(thread.lane) + " of warp " + std::to_string(thread.warp) +
                  " of block " + block_text() + " exited while lanes " + lanes_text(op.arrived) + " wait for it in " +
                  where(op.site) + " (mask " + mask_text(op.mask) + "; what a shuffle reads from it is undefined)"));
      } else if (complete(warp, op)) {
        finish(thread.warp, warp, static_cast<std::ptrdiff_t>(index), &thread);  // a __syncwarp waits no more for it
      } else {
        ++index;
      }
    }
    if (barrier_waiting_ > 0 && barrier_waiting_ == live_) release_barrier();
  }

  Thread* lane_thread(unsigned warp, unsigned lane) { return &threads_[warp * 32 + lane]; }

  void wait(Wait what, const Site& site) {
    Thread& self = *current_;
    self.runnable = false;
    self.wait = what;
    self.site = site;
    leaving(self, false);
    self.sink = std::move(self.sink).resume();
    arrived(self);
    if (aborting_) throw Abort{};
  }

  void release_barrier() {
    for (Thread& thread : threads_) {
      if (thread.wait == Wait::barrier) {
        thread.wait = Wait::none;
        thread.runnable = true;
      }
    }
    barrier_waiting_ = 0;
  }

  void check_shared_total(const Site& site) const {
    const std::size_t total = static_bytes_ + config_.shared_bytes;
    if (total > kSharedBytesWithoutOptIn) {
      fail(where(site) + ": block uses " + std::to_string(total) + " bytes of shared memory (" +
           std::to_string(static_bytes_) + " static, " + std::to_string(config_.shared_bytes) +
           " dynamic), more than the 49152 a kernel gets without opting in (cudaFuncSetAttribute)");
    }
  }

  [[noreturn]] void fail(const std::string& message) const { throw Error("SIMT: " + message); }

  // Tears the block down (each unfinished thread unwinds its stack) and rethrows its error.
  [[noreturn]] void abort_block() {
    const std::exception_ptr error = error_;
    error_ = nullptr;
    aborting_ = true;
    for (Thread& thread : threads_) {
      if (thread.fiber) resume(thread);
    }
    aborting_ = false;
    reset();
    std::rethrow_exception(error);
  }

  // The block's state back to what the next block starts from.
  void reset() {
    for (Warp& warp : warps_) {
      warp.pending.clear();
      warp.exited = 0;
    }
    shared_.clear();
    static_bytes_ = 0;
    barrier_waiting_ = 0;
  }

  std::string block_text() const {
    return "(" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
  }
  static std::string thread_text(const Thread& t) {
    return "(" + std::to_string(t.idx.x) + "," + std::to_string(t.idx.y) + "," + std::to_string(t.idx.z) + ")";
  }

  std::string deadlock_text() const {
    std::ostringstream text;
    text << "SIMT: block " << block_text() << " cannot go on (a GPU hangs here): ";
    if (barrier_waiting_ > 0) {
      text << barrier_waiting_ << " of " << live_ << " live threads wait at " << where(barrier_site_) << "; ";
    }
    for (std::size_t w = 0; w < warps_.size(); ++w) {
      for (const PendingOp& op : warps_[w].pending) {
        text << "warp " << w << " lanes " << lanes_text(op.arrived) << " wait in " << where(op.site) << " for lanes "
             << lanes_text(op.mask & ~op.arrived) << "; ";
      }
    }
    return text.str();
  }

  const LaunchConfig& config_;
  const std::function<void()>& body_;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  std::vector<SharedVariable> shared_;
  std::unique_ptr<unsigned char[]> dynamic_;
  std::size_t static_bytes_ = 0;
  unsigned live_ = 0;
  unsigned barrier_waiting_ = 0;
  Site barrier_site_{};
  Thread* current_ = nullptr;
  std::exception_ptr error_;
  bool aborting_ = false;
  std::uint64_t switches_ = 0;
  const void* scheduler_stack_bottom_ = nullptr;
  std::size_t scheduler_stack_size_ = 0;
};

thread_local Block* running = nullptr;

Block& running_block(const char* what) {
  if (running == nullptr) throw Error(std::string("SIMT: ") + what + " called outside a kernel");
  return *running;
}

void check_launch(const LaunchConfig& config) {
  const dim3 g = config.grid, b = config.block;
  std::ostringstream problem;
  bool cuda_rejects = true;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0) {
    problem << "an empty grid or block";
  } else if (threads > kMaxThreadsPerBlock) {
    problem << threads << " threads per block; CUDA allows 1024";
  } else if (b.z > kMaxBlockDimZ) {
    problem << "blockDim.z = " << b.z << "; CUDA allows at most 64";
  } else if (g.x > 2147483647u || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ) {
    problem << "gridDim.y and gridDim.z are at most 65535, gridDim.x at most 2^31 - 1";
  } else if (config.shared_bytes > kSharedBytesWithoutOptIn) {
    problem << config.shared_bytes << " bytes of dynamic shared memory, more than the 49152 a kernel gets without "
            << "opting in (cudaFuncSetAttribute)";
  } else if (1ull * g.x * g.y * g.z > kMaxBlocks) {
    problem << 1ull * g.x * g.y * g.z << " blocks: CUDA allows this grid, but the SIMT layer emulates at most 2^24";
    cuda_rejects = false;
  } else {
    return;
  }
  throw Error("SIMT: " + where(config.site) + " with grid (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," +
              std::to_string(g.z) + ") and block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
              std::to_string(b.z) + "): " + problem.str() +
              (cuda_rejects ? " (cudaErrorInvalidConfiguration on a GPU)" : ""));
}

}  // namespace

void run_grid(const LaunchConfig& config, const std::function<void()>& thread) {
  if (running != nullptr) throw Error("SIMT: " + where(config.site) + " inside a kernel (no dynamic parallelism)");
  check_launch(config);
  const unsigned long long count = 1ull * config.grid.x * config.grid.y * config.grid.z;
  std::vector<unsigned long long> order(count);
  std::iota(order.begin(), order.end(), 0ull);
  std::vector<unsigned> first_thread(count);
  {
    const std::lock_guard<std::mutex> lock(engine_mutex);
    std::shuffle(order.begin(), order.end(), block_order_engine);
    for (unsigned& first : first_thread) first = static_cast<unsigned>(block_order_engine());
  }
  Block block(config, thread);
  struct Running {
    explicit Running(Block* b) { running = b; }
    ~Running() { running = nullptr; }
  } scope(&block);
  gridDim = config.grid;
  blockDim = config.block;
  ++total_launches;
  struct Count {  // also when a block raises
    Block& block;
    ~Count() { total_switches += block.switches(); }
  } count_switches{block};
  for (unsigned long long k = 0; k < count; ++k) {
    const unsigned long long linear = order[k];
    blockIdx = uint3{static_cast<unsigned>(linear % config.grid.x),
                     static_cast<unsigned>(linear / config.grid.x % config.grid.y),
                     static_cast<unsigned>(linear / (1ull * config.grid.x * config.grid.y))};
    block.run(first_thread[k]);
    ++total_blocks;
    total_threads += 1ull * config.block.x * config.block.y * config.block.z;
  }
}

void syncthreads(Site site) { running_block("__syncthreads").syncthreads(site); }

std::uint64_t warp_exchange(Site site, WarpOp op, unsigned mask, std::uint64_t value, unsigned arg, int width) {
  return running_block(op_name(op)).warp_exchange(site, op, mask, value, arg, width);
}

void* static_shared(const void* key, Site site, std::size_t bytes, std::size_t align) {
  return running_block("__shared__").static_shared(key, site, bytes, align);
}

void* dynamic_shared() { return running_block("extern __shared__").dynamic(); }

void set_block_order_seed(std::uint64_t seed) {
  const std::lock_guard<std::mutex> lock(engine_mutex);
  block_order_engine.seed(seed);
}

Stats stats() { return Stats{total_launches, total_blocks, total_threads, total_switches}; }

}  // namespace pfc_simt
