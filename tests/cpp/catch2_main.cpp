// Catch2 version 2 needs one translation unit that defines main; version 3
// links Catch2::Catch2WithMain instead.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
