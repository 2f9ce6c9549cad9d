"""rentalml.monitoring"""
