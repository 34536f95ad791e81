// Emulated sm_90a synchronisation instructions (declared, with their rules, in emu/sm90.h).
#include "emu/sm90.h"

#include "emu/racecheck.h"
#include "emu/runtime.h"

#include <cstring>
#include <utility>

namespace kvk {

using emu::Block;
using emu::current;
using emu::current_block;
using emu::fail;
using emu::MBarrier;

namespace {

constexpr int64_t kTxLimit = (1 << 20) - 1;  // the PTX ISA's range of count and transaction bytes

// The tag in a live barrier's 8 bytes: the address mixed in, so a barrier copied elsewhere is no barrier.
uint64_t tag(uint32_t addr) { return 0x6D62617272696572ull ^ (static_cast<uint64_t>(addr) * 0x9E3779B97F4A7C15ull); }

void write_tag(uint32_t addr, uint64_t value) {
  emu::race::Internal internal;  // the barrier's own bytes are not a data access of the thread
  memcpy(emu::shared_ptr(addr, 8, 8, "mbarrier"), &value, 8);
}

MBarrier& barrier(uint32_t addr, const char* what) {
  unsigned char* p = emu::shared_ptr(addr, 8, 8, what);
  Block& b = current_block();
  auto it = b.mbarriers.find(addr);
  if (it == b.mbarriers.end()) fail("%s: no mbarrier was initialised at shared address %u", what, addr);
  uint64_t v;
  {
    emu::race::Internal internal;
    memcpy(&v, p, 8);
  }
  if (v != tag(addr)) fail("%s: the mbarrier at shared address %u was overwritten by a plain store", what, addr);
  return it->second;
}

// Completes the current phase if nothing is pending and wakes its waiters.
void maybe_complete(MBarrier& m) {
  if (m.pending != 0 || m.tx != 0) return;
  ++m.phase;
  m.pending = m.count;
  m.completed = std::exchange(m.arrivals, {});
  for (int t : m.waiters) emu::wake(t);
  m.waiters.clear();
}

void add_tx(MBarrier& m, int64_t delta, const char* what, uint32_t addr) {
  m.tx += delta;
  if (m.tx > kTxLimit || m.tx < -kTxLimit) {
    fail("%s: the transaction count of the mbarrier at shared address %u leaves +-(2^20 - 1): %lld", what, addr,
         static_cast<long long>(m.tx));
  }
}

void arrive(MBarrier& m) {
  emu::race::release(m.arrivals);
  --m.pending;
  maybe_complete(m);
}

bool phase_done(const MBarrier& m, uint32_t parity) { return (m.phase & 1u) != (parity & 1u); }

// A wait that sees the phase of `parity` complete acquires what its arrivals released.
bool observe(const MBarrier& m, uint32_t parity) {
  if (!phase_done(m, parity)) return false;
  emu::race::acquire(m.completed);
  return true;
}

}  // namespace

void mbarrier_init(uint32_t bar, uint32_t count) {
  emu::shared_ptr(bar, 8, 8, "mbarrier.init");
  if (count < 1 || count > kTxLimit) fail("mbarrier.init: count %u outside 1 .. 2^20 - 1", count);
  Block& b = current_block();
  auto it = b.mbarriers.find(bar);
  if (it != b.mbarriers.end() && !it->second.waiters.empty()) {
    fail("mbarrier.init: the mbarrier at shared address %u is re-initialised while threads wait on it", bar);
  }
  MBarrier m;
  m.count = m.pending = count;
  b.mbarriers[bar] = m;
  write_tag(bar, tag(bar));
}

void mbarrier_arrive(uint32_t bar) { arrive(barrier(bar, "mbarrier.arrive")); }

void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  const char* what = "mbarrier.arrive.expect_tx";
  MBarrier& m = barrier(bar, what);
  if (bytes > kTxLimit) fail("%s: %u bytes outside 0 .. 2^20 - 1", what, bytes);
  add_tx(m, bytes, what, bar);  // the expect_tx comes first, then the arrival
  arrive(m);
}

void mbarrier_expect_tx(uint32_t bar, uint32_t bytes) {
  const char* what = "mbarrier.expect_tx";
  MBarrier& m = barrier(bar, what);
  if (bytes > kTxLimit) fail("%s: %u bytes outside 0 .. 2^20 - 1", what, bytes);
  add_tx(m, bytes, what, bar);
}

void mbarrier_complete_tx(uint32_t bar, uint32_t bytes) {
  const char* what = "mbarrier.complete_tx";
  MBarrier& m = barrier(bar, what);
  emu::race::release(m.arrivals);  // the copy's writes, for the waiters of the phase
  add_tx(m, -static_cast<int64_t>(bytes), what, bar);
  maybe_complete(m);
}

bool mbarrier_test_wait_parity(uint32_t bar, uint32_t parity) {
  return observe(barrier(bar, "mbarrier.test_wait.parity"), parity);
}

bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity) {
  const char* what = "mbarrier.try_wait.parity";
  for (;;) {
    MBarrier& m = barrier(bar, what);  // looked up again after a wake: the map may have grown
    if (observe(m, parity)) return true;
    m.waiters.push_back(current().linear);
    emu::block_current(what);
  }
}

void fence_mbarrier_init() {}
void fence_proxy_async() {}

// ------------------------------------------------------------------------------ named barriers

namespace {

emu::NamedBarrier& named(int id, int count, const char* what) {
  const int threads = static_cast<int>(current_block().threads.size());
  if (id < 0 || id > 15) fail("%s: barrier id %d outside 0 .. 15", what, id);
  if (count <= 0 || count % 32 || count > threads) {
    fail("%s: thread count %d is not a positive multiple of 32 up to the block's %d", what, count, threads);
  }
  if (id == 0 && current_block().barrier_arrived) fail("%s: barrier 0 is in use by __syncthreads", what);
  emu::NamedBarrier& n = current_block().named[id];
  if (n.arrived && n.count != count) {
    fail("%s: barrier %d called with count %d while %d threads arrived with count %d", what, id, count, n.arrived,
         n.count);
  }
  n.count = count;
  return n;
}

// Counts the running thread; returns true when it completed the generation (everyone released).
// The waiters (bar.sync) acquire what all of the generation's arrivals released; `sync`: the
// running thread is one of them.
bool named_arrive(emu::NamedBarrier& n, bool sync) {
  emu::race::release(n.arrivals);
  if (++n.arrived < n.count) return false;
  for (int t : n.waiters) {
    emu::race::acquire_for(t, n.arrivals);
    emu::wake(t);
  }
  if (sync) emu::race::acquire(n.arrivals);
  n.waiters.clear();
  n.arrivals = emu::race::Clock{};
  n.arrived = n.count = 0;
  return true;
}

}  // namespace

void named_barrier_sync(int id, int count) {
  const char* what = "bar.sync";
  emu::NamedBarrier& n = named(id, count, what);
  if (named_arrive(n, true)) return;
  n.waiters.push_back(current().linear);
  emu::block_current(what);
}

void named_barrier_arrive(int id, int count) { named_arrive(named(id, count, "bar.arrive"), false); }

// ------------------------------------------------------------------------------ elect.sync

namespace {

void elect_fn(emu::Warp& w, Block&) {
  const int leader = __builtin_ctz(w.mask);
  for (int l = 0; l < emu::kWarpSize; ++l) w.out[l][0] = l == leader;
}

}  // namespace

bool elect_sync(uint32_t mask) {
  if (!mask) fail("elect.sync: empty member mask");
  return emu::warp_collective("elect.sync", elect_fn, mask, nullptr, 0)[0] != 0;
}

// ------------------------------------------------------------------------------ setmaxnreg

void setmaxnreg(bool inc, int regs) {
  const char* what = inc ? "setmaxnreg.inc.sync.aligned" : "setmaxnreg.dec.sync.aligned";
  Block& b = current_block();
  emu::Thread& t = current();
  if (b.threads.size() % 128) fail("%s: the block's %zu threads are not whole warpgroups", what, b.threads.size());
  if (regs < 24 || regs > 256 || regs % 8) fail("%s: %d registers, not a multiple of 8 in 24 .. 256", what, regs);
  const int g = t.linear / 128;
  emu::Warpgroup& wg = b.warpgroups[g];
  if (wg.arrived == 0) {
    wg.inc = inc;
    wg.requested = regs;
  } else if (wg.inc != inc || wg.requested != regs) {
    fail("%s %d: warpgroup %d diverged, %d of its threads are at setmaxnreg.%s %d", what, regs, g, wg.arrived,
         wg.inc ? "inc" : "dec", wg.requested);
  }
  if (++wg.arrived < 128) {
    const unsigned gen = wg.generation;
    wg.waiters.push_back(t.linear);
    while (wg.generation == gen) emu::block_current(what);  // the last thread applies it for all
    return;
  }
  // The whole warpgroup is here.
  if (inc && regs < wg.regs) {
    fail("%s %d: warpgroup %d has %d registers per thread, .inc cannot lower it", what, regs, g, wg.regs);
  }
  if (!inc && regs > wg.regs) {
    fail("%s %d: warpgroup %d has %d registers per thread, .dec cannot raise it", what, regs, g, wg.regs);
  }
  auto total = [&b] {
    long sum = 0;
    for (const emu::Warpgroup& o : b.warpgroups) sum += 128L * o.regs;
    return sum;
  };
  // An .inc waits until the other warpgroups have given enough back (woken by their .dec).
  while (inc && total() - 128L * wg.regs + 128L * regs > 65536) {
    wg.room_waiter = t.linear;
    emu::block_current(what);
  }
  wg.room_waiter = -1;
  wg.regs = regs;
  wg.arrived = 0;
  ++wg.generation;
  for (int o : wg.waiters) emu::wake(o);
  wg.waiters.clear();
  if (!inc) {
    for (emu::Warpgroup& o : b.warpgroups) {
      if (o.room_waiter >= 0) emu::wake(o.room_waiter);
    }
  }
}

}  // namespace kvk
