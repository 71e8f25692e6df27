@0xd6a3b1f0c2e4a871;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("own_deps");

struct Pair {
  a @0 :Int64;
  b @1 :Int64;
}
