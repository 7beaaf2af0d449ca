"""Built-in payment-processor plugins: `nowpayments` (hosted crypto payments) and `btcpay`
(a self-hosted BTCPay Server). Both load through the `apifast.payments` entry points, exactly
as third-party processors do; the contract is `apifast.payments`."""
