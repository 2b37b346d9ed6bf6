//! Dtypes, devices, strided views and buffers for moeshift.
