"""Click-to-call: who is asking (the CRM's logins) and a callback checked against the
dialling policy, asked of Zadarma and recorded.
"""
