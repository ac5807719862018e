cd "$(dirname "$0")/.."
echo "== compilers"; which g++ c++ gcc; echo "CXX=$CXX CC=$CC"; g++ --version | head -1; /opt/gcc/bin/g++ --version | head -1; ls /usr/bin/g++* 2>/dev/null
python3 -c "import sysconfig;print(sysconfig.get_config_var('LDSHARED'))"
python3 -c "import torch;print(torch.__config__.show())" | head -4
ldconfig -p | grep -E "libstdc\+\+|libgcc_s" | head
echo "== build"; T0=$(date +%s)
ARD_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-T0 ))s"
ldd ard_kernels/_C*.so | grep -E "stdc|gcc_s|cudart|c10"
for c in cpu cuda cuda_num_heads; do timeout 60 python3 diag/repro.py $c; echo "$c rc=$?"; done
if [ -x /usr/bin/g++ ]; then
  echo "== rebuild with /usr/bin/g++"; rm -rf build ard_kernels/_C*.so
  CXX=/usr/bin/g++ CC=/usr/bin/gcc ARD_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > $OUT/build2.log 2>&1; echo "build2 rc=$?"
  grep -m1 "g++" $OUT/build2.log | cut -c1-80
  for c in cpu cuda; do timeout 60 python3 diag/repro.py $c; echo "sys-g++ $c rc=$?"; done
  rm -rf build ard_kernels/_C*.so
  ARD_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > /dev/null 2>&1
fi
echo "== cuda-gdb"; timeout 100 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt --args python3 diag/repro.py cuda > $OUT/gdb.txt 2>&1; echo "gdb rc=$?"
grep -E "^#[0-9]+|SIGSEGV|signal" $OUT/gdb.txt | head -40
