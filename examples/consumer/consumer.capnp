@0xe5a7c3d1b2f40a96;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("consumer");

struct Point {
  x @0 :Int64;
  y @1 :Int64;
}
