// Cost of one switch between two execution contexts, Boost.Context's fiber (fcontext) against
// ucontext's swapcontext: the measurement behind the SIMT layer's choice of Boost.Context
// (csrc/simt/simt.cpp). Build and run (on an idle machine):
//   g++ -O2 benchmarks/simt_context_switch.cpp -o /tmp/switch -lboost_context && /tmp/switch
#include <ucontext.h>

#include <boost/context/fiber.hpp>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {
constexpr long kRounds = 2'000'000;  // each round switches there and back
ucontext_t host_context, fiber_context;

void ucontext_body() {
  for (;;) swapcontext(&fiber_context, &host_context);
}

template <typename F>
double nanoseconds_per_switch(F&& round_trip) {
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < kRounds; ++i) round_trip();
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / (2.0 * kRounds);
}
}  // namespace

int main() {
  namespace ctx = boost::context;
  ctx::fiber fiber{[](ctx::fiber&& host) {
    for (;;) host = std::move(host).resume();
    return std::move(host);
  }};
  const double boost_ns = nanoseconds_per_switch([&] { fiber = std::move(fiber).resume(); });

  std::vector<char> stack(64 << 10);
  getcontext(&fiber_context);
  fiber_context.uc_stack.ss_sp = stack.data();
  fiber_context.uc_stack.ss_size = stack.size();
  fiber_context.uc_link = nullptr;
  makecontext(&fiber_context, ucontext_body, 0);
  const double ucontext_ns = nanoseconds_per_switch([&] { swapcontext(&host_context, &fiber_context); });

  std::printf("Boost.Context fiber (fcontext): %6.1f ns per switch\n", boost_ns);
  std::printf("ucontext swapcontext:           %6.1f ns per switch\n", ucontext_ns);
}
