// Empty stand-in: the emulation harness defines the few CUDA types the kernel header uses.
#pragma once
